"""Time GradSentry scoring against the per-sample reference and a plain forward pass.

One run scores the same WebQuestions rows three ways and writes
``benchmarks/results/performance.json``:

- reference: per-sample autograd on the output projection, then exact singular values;
- fast: the batched exact path (shared prefix, logits at target positions only, Gram spectrum);
- forward: a plain batched ``torch.no_grad()`` forward pass of the same model over the same
  padded batches, with logits at every position, as a user would run the model.

It also scores generated datasets of short rows with a tiny random Llama through the
streaming scorer, each size in its own process, and records each run's peak resident memory.

CPU (SmolLM2-135M-Instruct, the default)::

    .venv/bin/python benchmarks/performance.py

CUDA (a 7B-shaped Llama with random bf16 weights, batch sizes 1 to 64)::

    python benchmarks/performance.py --device cuda --shape llama-7b --dtype bfloat16 \
        --batch-sizes 1,2,4,8,16,32,64 --streaming-rows ""
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))

from gradsentry_dagster.data import read_dataset  # noqa: E402
from gradsentry_dagster.scoring import (  # noqa: E402
    PrefixStates,
    ScoringSettings,
    encode_frame,
    output_projection,
    pad_batch,
    score_batch_exact,
    score_sample_reference,
    template_prefix_length,
)

SHARED_DATA = Path(os.environ.get("GRADSENTRY_SHARED_DATA", PROJECT_ROOT.parent / "shared" / "data"))
DEFAULT_DATA = SHARED_DATA / "webquestions" / "trainmodel.json"
RESULTS = PROJECT_ROOT / "benchmarks" / "results" / "performance.json"

# Llama-2-7B's shape; the vocabulary is the tokenizer's so that every token id is valid.
SHAPES = {
    "llama-7b": dict(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
    ),
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
}


def peak_rss_mb() -> float:
    """Return this process's peak resident memory in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load(shape: str | None, device: torch.device, dtype: torch.dtype):
    """Return ``(model, tokenizer, name)``: SmolLM2, or a random Llama of a named shape."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from gradsentry_dagster.models import ModelSpec, embedded_model_dir, load_model

    if shape is None:
        dtype_name = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
        loaded = load_model(ModelSpec(device=str(device), dtype=dtype_name[dtype]))
        return loaded.model, loaded.tokenizer, "SmolLM2-135M-Instruct"

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir())
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=4096, **SHAPES[shape])
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype).eval()
    return model, tokenizer, f"random Llama, {shape} shape"


def batches(samples: list, batch_size: int) -> list[list]:
    """Split samples, sorted by length as the scorer sorts them, into batches."""
    ordered = sorted(samples, key=lambda sample: len(sample.input_ids))
    return [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]


def compare(model, tokenizer, samples, batch_size, device) -> dict:
    """Time the three paths on the same samples and compare their scores.

    The paths take turns batch by batch, in a rotating order, so that a change in the load
    of a shared machine during the run falls on all three alike.
    """
    pad_id = tokenizer.pad_token_id
    reference_settings = ScoringSettings(method="reference")
    fast_settings = ScoringSettings(batch_size=batch_size)
    groups = batches(samples, batch_size)
    weight = output_projection(model).weight.detach().float()
    prefix_states = PrefixStates(model, max_length=template_prefix_length(tokenizer, fast_settings))

    def reference(group):
        return [score_sample_reference(model, sample, reference_settings).score for sample in group]

    def fast(group):
        results = score_batch_exact(
            model, group, fast_settings, pad_id, projection_weight=weight, prefix_states=prefix_states
        )
        return [result.score for result in results]

    @torch.no_grad()
    def forward(group):
        padded = pad_batch(group, pad_id)
        model(
            input_ids=padded.input_ids.to(device),
            attention_mask=padded.attention_mask.to(device),
            use_cache=False,
        )
        return []

    # One untimed small batch each, so that one-time setup is not timed.
    paths = {"reference": reference, "fast": fast, "forward": forward}
    for path in paths.values():
        path(groups[0][:2])

    names = list(paths)
    seconds = dict.fromkeys(names, 0.0)
    scores: dict[str, list[float]] = {name: [] for name in names}
    for index, group in enumerate(groups):
        for name in names[index % 3 :] + names[: index % 3]:
            synchronize(device)
            start = time.perf_counter()
            scores[name].extend(paths[name](group))
            synchronize(device)
            seconds[name] += time.perf_counter() - start
        totals = ", ".join(f"{name} {seconds[name]:.1f} s" for name in names)
        print(f"  batch {index + 1}/{len(groups)}: {totals}", flush=True)

    n = len(samples)
    differences = [abs(a - b) for a, b in zip(scores["fast"], scores["reference"])]
    return {
        "batch_size": batch_size,
        "reference_ms_per_sample": 1000 * seconds["reference"] / n,
        "fast_ms_per_sample": 1000 * seconds["fast"] / n,
        "forward_ms_per_sample": 1000 * seconds["forward"] / n,
        "speedup_vs_reference": seconds["reference"] / seconds["fast"],
        "throughput_vs_forward": seconds["forward"] / seconds["fast"],
        "max_abs_score_diff": max(differences),
        "_samples": [sample for group in groups for sample in group],
        "_reference_scores": scores["reference"],
    }


def randomized_distance(model, samples, reference_scores, limit: int = 8) -> dict:
    """Distance of the randomized SVD estimator (GradSentry's reference code) from exact,
    on the first ``limit`` samples."""
    settings = ScoringSettings(method="reference", estimator="randomized")
    samples = samples[:limit]
    randomized = [score_sample_reference(model, sample, settings).score for sample in samples]
    differences = [abs(a - b) for a, b in zip(randomized, reference_scores)]
    return {
        "n_samples": len(samples),
        "max_abs_score_diff": max(differences),
        "mean_abs_score_diff": sum(differences) / len(differences),
    }


def word_tokenizer():
    """Return a fast word-level tokenizer over the QA template and the generated rows' words.

    Digits are single tokens, so every generated row is covered by a vocabulary of about 40.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from gradsentry_dagster.prompts import render_prompt
    from gradsentry_dagster.streaming import GENERATED_WORDS

    splitter = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)]
    )
    text = " ".join([render_prompt("", "", "where is ?"), *GENERATED_WORDS, *"0123456789"])
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    for word, _ in splitter.pre_tokenize_str(text):
        vocab.setdefault(word, len(vocab))
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = splitter
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


def streaming_worker(rows: int, batch_size: int) -> dict:
    """Generate ``rows`` short rows, stream-score them with a tiny model, report memory.

    The model is a one-layer Llama of hidden size 32 over a small word vocabulary, so that a
    million rows finish in minutes on two CPU cores; memory, not speed, is measured here.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    from gradsentry_dagster.streaming import score_file, write_generated_dataset

    torch.set_num_threads(1)
    tokenizer = word_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with tempfile.TemporaryDirectory(prefix="gradsentry-stream-") as folder:
        source = write_generated_dataset(Path(folder) / "rows.parquet", rows)
        output = Path(folder) / "scores.parquet"
        start = time.perf_counter()
        summary = score_file(
            model, tokenizer, source, output,
            ScoringSettings(batch_size=batch_size, max_tokens=96), chunk_rows=16384,
        )
        seconds = time.perf_counter() - start
    return {
        "rows": rows,
        "rows_written": summary.rows_written,
        "scored": summary.scored,
        "rejected": summary.rejected,
        "seconds": seconds,
        "peak_rss_mb": peak_rss_mb(),
    }


def run_streaming(sizes: list[int], batch_size: int) -> list[dict]:
    """Run each streaming size in a fresh process so that its peak memory is its own."""
    results = []
    for rows in sizes:
        command = [sys.executable, __file__, "--streaming-worker", str(rows), "--batch-size", str(batch_size)]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        result = json.loads(output.strip().splitlines()[-1])
        print(
            f"streaming {result['rows']} rows: {result['seconds']:.0f} s, "
            f"peak RSS {result['peak_rss_mb']:.0f} MiB"
        )
        results.append(result)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="WebQuestions JSON file.")
    parser.add_argument("--n-samples", type=int, default=96, help="Rows timed on every path.")
    parser.add_argument("--batch-size", type=int, default=16, help="Batch size of the CPU run.")
    parser.add_argument(
        "--batch-sizes", default="", help="Comma-separated batch sizes; overrides --batch-size."
    )
    parser.add_argument("--device", default="cpu", help="Torch device, e.g. cpu or cuda.")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument(
        "--shape", choices=sorted(SHAPES), default=None,
        help="Random Llama of this shape instead of SmolLM2-135M-Instruct.",
    )
    parser.add_argument(
        "--streaming-rows", default="100000,1000000",
        help="Comma-separated sizes of the generated streaming datasets; empty to skip.",
    )
    parser.add_argument("--output", type=Path, default=RESULTS, help="Where the JSON goes.")
    parser.add_argument(
        "--streaming-from", type=Path, default=None,
        help="Copy the streaming results of an earlier result file instead of rerunning them.",
    )
    parser.add_argument("--streaming-worker", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.streaming_worker is not None:
        print(json.dumps(streaming_worker(args.streaming_worker, args.batch_size)))
        return

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    model, tokenizer, model_name = load(args.shape, device, dtype)
    frame = read_dataset(args.data, preset="webquestions", limit=args.n_samples)
    encoded, rejected = encode_frame(tokenizer, frame, ScoringSettings())
    samples = list(encoded.values())
    print(f"{model_name} on {device} ({args.dtype}): {len(samples)} WebQuestions rows, "
          f"{len(rejected)} rejected, torch threads {torch.get_num_threads()}", flush=True)

    sizes = [int(size) for size in args.batch_sizes.split(",") if size] or [args.batch_size]
    runs = []
    reference_scores = None
    for batch_size in sizes:
        run = compare(model, tokenizer, samples, batch_size, device)
        reference_scores = run.pop("_reference_scores")
        ordered_samples = run.pop("_samples")
        print(
            f"batch {batch_size}: reference {run['reference_ms_per_sample']:.1f} ms/sample, "
            f"fast {run['fast_ms_per_sample']:.1f}, forward {run['forward_ms_per_sample']:.1f}; "
            f"speedup vs reference {run['speedup_vs_reference']:.2f}x, "
            f"throughput vs forward {run['throughput_vs_forward']:.2f}x, "
            f"max |score diff| {run['max_abs_score_diff']:.2e}"
        )
        runs.append(run)

    randomized = randomized_distance(model, ordered_samples, reference_scores)
    print(f"randomized estimator vs exact: max |diff| {randomized['max_abs_score_diff']:.2e}")

    result = {
        "model": model_name,
        "device": str(device) if device.type != "cpu" else f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "dtype": args.dtype,
        "n_samples": len(samples),
        # The top-level timing keys are those of the first batch size; all are in the list.
        **runs[0],
        "batch_sizes": runs,
        "randomized_estimator": randomized,
        "peak_rss_mb": peak_rss_mb(),
    }
    streaming_sizes = [int(size) for size in args.streaming_rows.split(",") if size]
    if args.streaming_from is not None:
        result["streaming"] = json.loads(args.streaming_from.read_text())["streaming"]
        result["streaming_source"] = f"copied from an earlier run ({args.streaming_from.name})"
    elif streaming_sizes:
        result["streaming"] = run_streaming(streaming_sizes, batch_size=512)

    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
