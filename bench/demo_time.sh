#!/usr/bin/env bash
# Wall time of the demo's stages: model load (and GGUF conversion on a fresh TUNELAB_HOME), tokenize, train, evaluate.
#
#   bash bench/demo_time.sh                       # uses the cached converted model
#   TUNELAB_HOME=$(mktemp -d) bash bench/demo_time.sh   # includes the one-time GGUF conversion
#
# Prints one line per stage and writes bench/results/demo_time.json. Run it alone: two CPU-heavy
# processes on a 2-core machine slow each other down far more than 2x.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p bench/results
start=$(date +%s.%N)
.venv/bin/tunelab demo --json > bench/results/demo_summary.json
end=$(date +%s.%N)
.venv/bin/python - "$start" "$end" <<'PY'
import json, sys
start, end = map(float, sys.argv[1:3])
s = json.load(open("bench/results/demo_summary.json"))
stages = {**s["timings"], "wall (process, incl. imports)": end - start}
for name, seconds in stages.items():
    print(f"{name:<32} {seconds:8.1f} s")
print(f"{s['metric']}: fine-tune {s['finetune']['value']:.3f}, best base contender "
      f"{max(s[n]['value'] for n in ('base_zero_shot', 'base_few_shot') if n in s):.3f} on {s['test_rows']} rows")
json.dump({"stages_seconds": stages, "metric": s["metric"], "finetune": s["finetune"]["value"]},
          open("bench/results/demo_time.json", "w"), indent=2)
PY
