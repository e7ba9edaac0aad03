"""The compiled hook's gather launch on a GPU: one raw kernel launch per hooked call.

`at::cat_out` of a call's staged arrays into the device ring D costs ~15 us of host time per call
on an H200 host (the dispatcher, a TensorList, meta checks, the caching allocator's bookkeeping),
three times the whole per-call budget. The same copy as one `cuLaunchKernel` of our own kernel,
the arrays' addresses and lengths passed by value in the kernel's parameters, costs a driver
call (~2-3 us) and no allocation.

The kernel is compiled at capture start with NVRTC (`torch.cuda._compile_kernel`, ~0.3 s once)
so nothing CUDA is needed where the package is built; the compiled hook receives the kernel's
CUfunction and the driver's `cuLaunchKernel` as addresses (`Session.set_gather`). Where NVRTC or
the driver is missing, or a launch fails, the hook keeps `at::cat_out` (same bytes, same place).

Layout in D: the arrays' bytes back to back from the reserved start, exactly as `torch.cat` of
their byte views puts them (device_stage.DeviceStage.gather), so the writer cannot tell the two
apart.
"""
from __future__ import annotations

import ctypes
import logging
from typing import Any

log = logging.getLogger("epreplay.capture")

# Segments per launch: the kernel's parameter block holds their addresses and offsets (< 1 KiB,
# well under the 4 KiB parameter limit). A call with more arrays takes at::cat_out.
MAX_SEGS = 24  # = EP_MAX_SEGS below and kMaxSegs in _hookx.cpp

SOURCE = r"""
#define EP_MAX_SEGS 24
struct EpGather {
  unsigned long long dst;                    // D + (start % cap)
  unsigned long long src[EP_MAX_SEGS];       // each array's first byte
  unsigned long long off[EP_MAX_SEGS + 1];   // each array's offset from dst; off[n] = total
  int n;
};
// Grid-stride copy of every segment, 16 bytes a thread where the addresses and length allow,
// then 4, then 1 (int32 arrays of odd lengths put later segments off 16-byte alignment).
extern "C" __global__ void epreplay_gather(EpGather a) {
  unsigned long long tid = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
  unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
  for (int i = 0; i < a.n; i++) {
    unsigned long long s = a.src[i], d = a.dst + a.off[i], nb = a.off[i + 1] - a.off[i];
    if (((s | d | nb) & 15ull) == 0) {
      const uint4 *s4 = (const uint4 *)s;
      uint4 *d4 = (uint4 *)d;
      for (unsigned long long k = tid; k < (nb >> 4); k += stride) d4[k] = s4[k];
    } else if (((s | d | nb) & 3ull) == 0) {
      const unsigned int *s1 = (const unsigned int *)s;
      unsigned int *d1 = (unsigned int *)d;
      for (unsigned long long k = tid; k < (nb >> 2); k += stride) d1[k] = s1[k];
    } else {
      const unsigned char *s1 = (const unsigned char *)s;
      unsigned char *d1 = (unsigned char *)d;
      for (unsigned long long k = tid; k < nb; k += stride) d1[k] = s1[k];
    }
  }
}
"""

_loaded: dict[int, Any] = {}  # device index -> kernel (kept alive: the module must stay loaded)


def load(device: Any) -> tuple[int, int] | None:
    """(CUfunction address, cuLaunchKernel address) of the gather kernel on `device`, or None
    where it cannot be had (the hook then keeps at::cat_out). Compiled once per device."""
    import torch

    try:
        index = torch.device(device).index
        index = torch.cuda.current_device() if index is None else index
        kernel = _loaded.get(index)
        if kernel is None:
            with torch.cuda.device(index):  # the module belongs to this device's context
                kernel = torch.cuda._compile_kernel(SOURCE, "epreplay_gather")
            _loaded[index] = kernel
        lib = ctypes.CDLL("libcuda.so.1")
        launch = ctypes.cast(lib.cuLaunchKernel, ctypes.c_void_p).value
        func = kernel.func.value if isinstance(kernel.func, ctypes.c_void_p) else int(kernel.func)
        if not func or not launch:
            return None
        return int(func), int(launch)
    except Exception as exc:  # no NVRTC, an old torch, no driver: the slower launch still works
        log.info("epreplay capture: gather kernel unavailable (%s); using torch.cat", exc)
        return None


def current_stream_handle() -> int:
    """The calling thread's current CUDA stream as a raw cudaStream_t (the hook caches it per
    stream id, so this runs once per stream)."""
    import torch

    return int(torch.cuda.current_stream().cuda_stream)
