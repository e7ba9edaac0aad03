"""epreplay.format: what a recording is on disk, as bytes and numpy arrays.

Owns the record types (records), the array codec, the shard file (writer, frames, reader, repair),
the run folder (run, census), the fingerprint and FP8 definitions, and the pure functions over
record headers that later stages share (steps found in the traffic, the cross-node clock).
May import: epreplay.errors, numpy, zstandard; torch (and triton) only in the tensor modules
fingerprint, fingerprint_cpu (with its C pass _fpc.c), fingerprint_gpu, fingerprint_kernels and
fp8. Never duckdb, textual, nor any other epreplay package.
"""
