"""Builds the optional C accelerators of capture's hot path (capture/_ringc.c) and of the index's
aggregation (epreplay/index/_indexc.c), and puts the
`deep_ep` stand-in's start-up hook (epreplay/epreplay_standin.pth) at the top of the wheel, i.e. in
site-packages, where every interpreter's `site` module reads it. Everything else is in
pyproject.toml. Where no C compiler or Python headers are found the build goes on without the
accelerator (optional=True) and capture writes its frames in Python (same frames, slower)."""
from __future__ import annotations

import os
import shutil

from setuptools import Extension, setup
from setuptools.command.build_py import build_py

PTH = "epreplay_standin.pth"  # must match epreplay.standin.PTH_NAME


class build_py_with_pth(build_py):
    """build_py that also copies the .pth to the top level of the wheel being built.

    A regular wheel is packed from build_lib, so the file goes there. An editable wheel
    (`pip install -e .`, setuptools' editable_wheel) throws build_lib away and packs its
    "unpacked wheel" folder instead, which it hands to the install command as install_lib; the file
    goes there. Either way pip puts it in site-packages and lists it in RECORD (so uninstall removes
    it). `python -m epreplay.standin --install-pth` is the fallback where a tool drops it.
    """

    def run(self) -> None:
        super().run()
        src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "epreplay", PTH)
        root = self.build_lib
        if getattr(self, "editable_mode", False):
            root = self.get_finalized_command("install").install_lib
        os.makedirs(root, exist_ok=True)
        shutil.copyfile(src, os.path.join(root, PTH))


setup(ext_modules=[Extension("epreplay.capture._ringc", ["capture/_ringc.c"], optional=True,
                             extra_compile_args=["-O2"]),
                   # the device ring's drain thread and the quiet lock (capture/device_stage.py)
                   Extension("epreplay.capture._drainc", ["capture/_drainc.c"], optional=True,
                             extra_compile_args=["-O2"], libraries=["pthread"]),
                   # the index's routing aggregation (index/shard.py _chunk; numpy where not built)
                   Extension("epreplay.index._indexc", ["epreplay/index/_indexc.c"], optional=True,
                             extra_compile_args=["-O2"]),
                   # the capture writer's CPU row fingerprints (format/fingerprint_cpu.py; torch where not built)
                   Extension("epreplay.format._fpc", ["epreplay/format/_fpc.c"], optional=True,
                             extra_compile_args=["-O2"])],
      cmdclass={"build_py": build_py_with_pth})
