"""What the fine-tuning API costs over `tunelab train` on the same data and config, and how long from upload to a
model that answers.

    python bench/job_overhead.py [--rows-per-label 40] [--labels 8] [--epochs 3] [--json bench/results/job_overhead.json]

The same Banking77 subset (chat JSONL, the demo's system prompt) and the same hyperparameters, run two ways,
one after the other on this machine, each timed from outside:

  train   `python -m tunelab train CONFIG.yaml` in a subprocess: start to exit (load, train, evaluate, write)
  api     a `tunelab serve` subprocess already up (its start is not counted); the openai SDK uploads the file,
          creates the job, polls it until `succeeded`, then asks the fine-tune one question. Reported: upload to
          succeeded, upload to the first answer (the time from upload to a servable model), and the ratio of
          upload-to-succeeded over `tunelab train`'s time: the queue, the worker process, heartbeats and the
          result files, over the same training and evaluation.

Prints the CPU model and its extensions; a ratio is only meaningful within one run on one machine.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SYSTEM = "Classify the intent."


def rows(labels: int, per_label: int) -> list[dict]:
    by_label = defaultdict(list)
    with (REPO / "examples" / "banking77" / "train.csv").open(newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            by_label[row["category"]].append(row["text"])
    return [{"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text},
                          {"role": "assistant", "content": label}]}
            for label in sorted(by_label)[:labels] for text in by_label[label][:per_label]]


def tunelab_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")])),
            "PYTHONUNBUFFERED": "1"}


def time_train(folder: Path, data: Path, extra: dict, epochs: int, batch: int) -> float:
    config = folder / "config.json"  # YAML is a superset of JSON
    config.write_text(json.dumps({"name": "bench", "output_dir": str(folder / "runs"), "model": "smollm2-135m-instruct",
                                  "data": {"path": str(data), **extra["data"]},
                                  "train": {"epochs": epochs, "batch_size": batch, "checkpoint_every": 50,
                                            **extra["train"]},
                                  "eval": extra["eval"]}))
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "tunelab", "train", str(config)], check=True, env=tunelab_env(),
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def time_api(folder: Path, data: Path, extra: dict, epochs: int, batch: int) -> dict[str, float]:
    import openai

    log = folder / "serve.log"
    with log.open("wb") as out:
        server = subprocess.Popen([sys.executable, "-m", "tunelab", "serve", "--port", "0", "--storage",
                                   str(folder / "service")], stdout=out, stderr=subprocess.STDOUT, env=tunelab_env())
    try:
        url = None
        while url is None:
            assert server.poll() is None, log.read_text()
            for line in log.read_text(errors="replace").splitlines():
                if "running on http://127.0.0.1:" in line.lower():
                    url = "http://127.0.0.1:" + line.lower().split("http://127.0.0.1:")[1].split()[0]
            time.sleep(0.2)
        c = openai.OpenAI(base_url=f"{url}/v1", api_key="local", max_retries=0, timeout=600)
        started = time.perf_counter()
        with data.open("rb") as f:
            uploaded = c.files.create(file=f, purpose="fine-tune")
        job = c.fine_tuning.jobs.create(
            model="smollm2-135m-instruct", training_file=uploaded.id,
            method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": epochs, "batch_size": batch}}},
            extra_body={"tunelab": extra})
        while (job := c.fine_tuning.jobs.retrieve(job.id)).status not in ("succeeded", "failed", "cancelled"):
            time.sleep(0.5)
        succeeded = time.perf_counter() - started
        assert job.status == "succeeded", job.error
        c.chat.completions.create(model=job.fine_tuned_model, max_tokens=8, temperature=0,
                                  messages=[{"role": "system", "content": SYSTEM},
                                            {"role": "user", "content": "where is my card?"}])
        return {"upload_to_succeeded_s": succeeded, "upload_to_first_answer_s": time.perf_counter() - started}
    finally:
        server.terminate()
        server.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--labels", type=int, default=8)
    parser.add_argument("--rows-per-label", type=int, default=40)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO / "src"))
    from tunelab.model.precision import detect_hardware

    hardware = detect_hardware().describe()
    print(f"cpu: {hardware}, {os.cpu_count()} cores, {platform.python_version()}")
    extra = {"data": {"max_length": 128}, "train": {"learning_rate": 2e-3, "val_rows": 16},
             "eval": {"forgetting_probe": False}}
    with tempfile.TemporaryDirectory(prefix="tunelab-job-bench-") as tmp:
        folder = Path(tmp)
        data = folder / "banking.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows(args.labels, args.rows_per_label)))
        train_s = time_train(folder, data, extra, args.epochs, args.batch)
        print(f"tunelab train: {train_s:.1f} s")
        api = time_api(folder, data, extra, args.epochs, args.batch)
    ratio = api["upload_to_succeeded_s"] / train_s
    print(f"api: upload -> succeeded {api['upload_to_succeeded_s']:.1f} s ({ratio:.2f}x tunelab train); "
          f"upload -> first answer {api['upload_to_first_answer_s']:.1f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"cpu": hardware, "rows": args.labels * args.rows_per_label,
                                         "epochs": args.epochs, "batch": args.batch, "tunelab_train_s": train_s,
                                         **api, "overhead_ratio": ratio}, indent=2) + "\n")


if __name__ == "__main__":
    main()
