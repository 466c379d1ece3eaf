"""Wall time and peak memory of the quick start on one camera-sized image.

A bundled demo hazelnut is upscaled (bicubic) to each size and saved as a JPEG (quality 90); then
``flawscope --pipeline anomaly_detection`` predicts it and writes its JSON and picture, in a
child process whose peak RSS is read from the operating system. The times include starting
Python and loading the model (about 3 s of them on 2 cores).

    python benchmarks/large_image.py --sizes 512x512 5472x3648 9000x9000
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

DEMO = Path(__file__).resolve().parents[1] / "src" / "flawscope" / "assets" / "demo" / "hazelnut_colour_defect.jpg"


def run_one(size: tuple[int, int], work: Path) -> dict:
    image = work / f"hazelnut_{size[0]}x{size[1]}.jpg"
    with Image.open(DEMO) as demo:
        demo.convert("RGB").resize(size, Image.Resampling.BICUBIC).save(image, quality=90)
    out = work / f"out_{size[0]}x{size[1]}"
    start = time.perf_counter()
    # One child per size, so each one's peak is its own (RUSAGE_CHILDREN is the largest child's).
    code = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    peak_kb = subprocess.run(
        [sys.executable, "-c", code, sys.executable, "-m", "flawscope", "--pipeline", "anomaly_detection",
         "--input", str(image), "--save_path", str(out)],
        check=True, capture_output=True, text=True,
    ).stdout.split()[-1]
    seconds = time.perf_counter() - start
    written = {p.name: p.stat().st_size for p in out.iterdir()}
    return {"size": f"{size[0]}x{size[1]}", "megapixels": round(size[0] * size[1] / 1e6, 1),
            "wall_s": round(seconds, 1), "peak_rss_mb": round(int(peak_kb) / 1024),
            "written_mb": round(sum(written.values()) / 2**20, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=["512x512", "5472x3648", "9000x9000"], help="WIDTHxHEIGHT")
    args = ap.parse_args()
    sizes = [tuple(int(v) for v in s.lower().split("x")) for s in args.sizes]
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            print(json.dumps(run_one(size, Path(tmp))), flush=True)


if __name__ == "__main__":
    main()
