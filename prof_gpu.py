import os, sys, tempfile, time
from epreplay.launch import run_ranks
def rank(ctx, root, level, tokens):
    import torch, torch.distributed as dist
    from epreplay import capture, epbench, emulate
    from epreplay.capture import session, ring_path as RP, device_stage as DS
    import epreplay.fingerprint_gpu as FG
    g = dist.group.WORLD
    shape = epbench.Shape(tokens=tokens, hidden=7168, experts=256, topk=8)
    buf = epbench.make_buffer(emulate, g, shape, low_latency=False)
    inp = epbench.make_inputs(shape, rank=0, step=0, device=ctx.device)
    step = lambda: epbench.normal_step(buf, inp, shape.experts)
    acc = {}
    def timed(name, fn):
        def w(*a, **k):
            t0 = time.perf_counter_ns(); r = fn(*a, **k); acc[name] = acc.get(name, 0) + time.perf_counter_ns() - t0; return r
        return w
    RP.write_call = timed("write_call", RP.write_call)
    RP.args_text = timed("args_text", RP.args_text)
    RP.stage_inputs = timed("stage_inputs", RP.stage_inputs)
    RP.stage_outputs = timed("stage_outputs", RP.stage_outputs)
    DS.DeviceStage.gather = timed("gather", DS.DeviceStage.gather)
    DS.DeviceStage._hashed = timed("hashed", DS.DeviceStage._hashed)
    FG.fingerprint_rows_fast = timed("fp_fast", FG.fingerprint_rows_fast)
    cat = torch.cat
    DS.torch = type("T", (), {})()
    for k in dir(torch):
        try: setattr(DS.torch, k, getattr(torch, k))
        except Exception: pass
    DS.torch.cat = timed("cat", cat)
    for _ in range(3): step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(20): step()
    torch.cuda.synchronize(); off = (time.perf_counter() - t0) / 20
    capture.start(os.path.join(root, "r"), level=level, layers_per_step=1)
    step()
    rec = session._recorder
    rp = rec._rp
    rec._op_meta = timed("op_meta", rec._op_meta)
    rec._ring_begin = timed("ring_begin", rec._ring_begin)
    rp.call_frame = timed("call_frame", rp.call_frame)
    rp._gather = timed("_gather", rp._gather)
    acc.clear()
    h0 = rec.hot_ns; c0 = rec.calls
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(20): step()
    torch.cuda.synchronize(); on = (time.perf_counter() - t0) / 20
    n = rec.calls - c0
    out = {k: v / n / 1e3 for k, v in acc.items()}
    out["hot"] = (rec.hot_ns - h0) / n / 1e3
    out["off_step_us"] = off * 1e6; out["on_step_us"] = on * 1e6
    import cProfile, pstats, io
    pr = cProfile.Profile(); pr.enable()
    for _ in range(10): step()
    pr.disable()
    sio = io.StringIO(); pstats.Stats(pr, stream=sio).sort_stats("tottime").print_stats(25)
    capture.stop()
    return out, sio.getvalue()
if __name__ == "__main__":
    out, prof = run_ranks(rank, 1, tempfile.mkdtemp(), sys.argv[1], int(sys.argv[2]), device="cuda", timeout=300)[0]
    for k, v in sorted(out.items(), key=lambda kv: -kv[1]): print(f"{k:15s} {v:8.2f} us/call")
    print(prof[:7000])
