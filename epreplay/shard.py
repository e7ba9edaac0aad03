"""The `.eprs` shard format: one append-only file per rank, a valid zstd stream.

Layout (see ../shared/DESIGN.md "Shard format"):
  file header  zstd skippable frame (magic 0x184D2A50) holding b"EPRS" + ShardInfo JSON
  record       skippable frame (magic 0x184D2A51) holding RecordHeader.to_bytes()
               + one zstd data frame (content size + checksum) holding the encoded arrays + meta
  footer       skippable frame (magic 0x184D2A52): offsets table, CRC, end magic; clean close only

API (the contract other modules code against):

  ShardWriter(path, info: ShardInfo, *, zstd_level=3, fsync_every=0)
      .append(header: RecordHeader, arrays: Mapping[str, np.ndarray], meta: Mapping | None) -> int
          encodes, compresses, writes and flushes one record; returns its byte offset.
          The header's comp_len/raw_len/crc32 are filled in here.
      .close() writes the footer.  Context manager.  Never overwrites: creating over an existing
          file raises FileExistsError. Files are created owner-only (0o600).
      .records, .bytes_written
  open_shard(path) -> ShardScan     (never raises for damage: reports it; raises ShardError only
                                     when the file is not a shard at all)
      .info: ShardInfo, .entries: list[Entry(offset, header)], .complete (valid footer),
      .truncated_at: int | None (byte offset of the first short/bad record), .lost_bytes,
      .problem: str | None (what went wrong, human readable), .size
      .read(entry) -> Record   (verifies CRC; raises ShardError naming the offset if bad)
      .records(ops=None, kinds=(Kind.CALL,)) -> Iterator[Record]
  repair(path) -> RepairReport  keeps PATH.bak, truncates to the valid prefix, writes a footer.
"""
