"""The benchmarks compute what they claim: every variant of a block and every backend of a model gives the same
outputs as unfused eager from every starting point of its batch, the shapes come from the models, the per-layer
breakdown names every convolution, and the result writers write what they say.

Timing is replaced by one plain call (these are correctness tests, not benchmarks); the fused rows run under the
Triton interpreter on a CPU, on small inputs. The `gpu` tests at the end run the GPU-only paths for real (CUDA
graph timing, pinned memory, the profiler's CUDA times), and check what the rows say, not how fast they are.
"""

import json
import logging
import re
import subprocess
import sys

import pytest
import torch

import models
from bench import blocks, common, layers, runners
from bench import model as model_bench
from service.repository import load_repository
from tests.support.numerics import TOLERANCES, assert_relative_close
from tests.support.server import REPO_ROOT


def _call_once(fn, timing, **_):
    fn()
    return {"median_ms": 1.0, "p20_ms": 0.9, "p80_ms": 1.1, "reps": 1, "timing": timing}


def _fixed_timing(fn, timing, **_):
    return {"median_ms": 1.0, "p20_ms": 0.9, "p80_ms": 1.1, "reps": 0, "timing": timing}


@pytest.fixture
def untimed(monkeypatch):
    monkeypatch.setattr(blocks, "bench_ms", _call_once)
    # A whole fused model under the interpreter takes seconds a call: its one output check is enough.
    monkeypatch.setattr(model_bench, "bench_ms", _fixed_timing)


def test_distinct_blocks_walk_the_models():
    model = models.build("resnet50", weights="random", seed=0)
    shapes = [shape for shape, _ in blocks.distinct_blocks(model, "resnet50", 224)]
    # stem, then per stage its first (projecting) block and one of the repeated ones
    assert [s.name for s in shapes] == ["stem"] + [f"layer{i}.{j}" for i in range(1, 5) for j in (0, 1)]
    assert shapes[0].in_shape == (3, 224, 224) and shapes[0].out_shape == (64, 112, 112)
    assert shapes[0].flops == 2 * 64 * 112 * 112 * 3 * 7 * 7
    assert shapes[1].in_shape == (64, 56, 56) and shapes[1].out_shape == (256, 56, 56)
    assert shapes[-1].in_shape == shapes[-1].out_shape == (2048, 7, 7)
    # each stage's repeated block consumes what its first block produces
    for first, repeated in zip(shapes[1::2], shapes[2::2], strict=True):
        assert repeated.in_shape == first.out_shape
    # 1x1 (C -> w), 3x3 (w -> w), 1x1 (w -> 4w) at w = 512: the weights of the last repeated bottleneck
    assert shapes[-1].weight_elements == 2048 * 512 + 512 * 512 * 9 + 512 * 2048


@pytest.mark.parametrize(
    ("arch", "names"),
    [("resnet18", {"stem", "layer2.0", "layer2.1"}), ("preact_resnet50", {"layer1.0", "layer3.1"})],
)
def test_block_variants_agree_with_unfused(untimed, arch, names):
    rows = list(blocks.benchmark_rows(
        [arch], [3], ["unfused", "folded", "fused"], torch.float32, torch.device("cpu"),
        input_size=40, select=lambda shape: shape.name in names,
    ))  # fmt: skip
    assert {row["name"] for row in rows} == names
    assert len(rows) == 3 * len(names)
    for row in rows:
        assert row["status"] == "ok", row
        assert row["rel_err"] < 1e-5, row
        assert row["speedup"] == pytest.approx(1.0)
        assert row["timing"] == "wall"  # on a GPU: cuda-graph (test_gpu_rows_say_what_they_time)


def test_summary_gives_each_variants_geometric_mean_speedup_per_batch():
    rows = [
        {"arch": "a", "batch": 1, "variant": variant, "status": "ok", "speedup": speedup}
        for variant, speedup in [("unfused", 1.0), ("folded", 2.0), ("folded", 0.5), ("folded", 8.0)]
    ]
    rows.append({"arch": "a", "batch": 1, "variant": "fused", "status": "skipped", "speedup": None})
    assert blocks.summarize(rows) == [
        {
            "arch": "a",
            "batch": 1,
            "variant": "folded",
            "blocks": 3,
            "geomean_speedup": pytest.approx(2.0),  # the arithmetic mean is 3.5
            "min_speedup": 0.5,
            "max_speedup": 8.0,
        }
    ]


def test_fold_block_matches_eager_in_every_block_kind():
    for arch in ("resnet18", "resnet50", "preact_resnet18", "preact_resnet50"):
        model = models.build(arch, weights="random", seed=1)
        for shape, block in blocks.distinct_blocks(model, arch, 32):
            x = torch.randn(2, *shape.in_shape)
            with torch.inference_mode():
                folded, eager = blocks.fold_block(block)(x), block(x)
            assert_relative_close(folded, eager, TOLERANCES[torch.float32], what=shape.label)


def test_fused_rows_need_a_gpu_without_the_interpreter(untimed, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    rows = list(blocks.benchmark_rows(
        ["resnet18"], [1], ["fused"], torch.float32, torch.device("cpu"),
        input_size=32, select=lambda shape: shape.name == "stem",
    ))  # fmt: skip
    assert [(r["variant"], r["status"], r["reason"]) for r in rows] == [
        ("unfused", "ok", None),
        ("fused", "skipped", "needs GPU"),
    ]


# DESIGN.md contract 8: what outside checks read from every row of model_*.json.
MODEL_ROW_KEYS = {"arch", "backend", "dtype", "batch", "input", "status", "images_per_s", "median_ms", "p20_ms",
                  "p80_ms", "rel_err"}  # fmt: skip


def test_model_backends_agree_with_eager_from_every_input(untimed):
    kinds = ["eager", "eager-channels-last", "onnxruntime", "compile-graphs", "fused", "fused-graphs"]
    cpu = torch.device("cpu")
    rows = list(model_bench.benchmark_rows(["digits_resnet"], [3], kinds, torch.float32, cpu, input_size=32))
    assert [(r["backend"], r["input"]) for r in rows] == [
        (k, i) for k in kinds for i in ("device", "pinned", "pageable")
    ]
    skipped = {(r["backend"], r["input"]): r["reason"] for r in rows if r["status"] == "skipped"}
    assert skipped == {
        **{
            (kind, i): "CUDA graphs need a GPU"
            for kind in ("compile-graphs", "fused-graphs")
            for i in ("device", "pinned", "pageable")
        },
        **{(kind, "pinned"): "pinned host memory needs CUDA" for kind in ("eager", "eager-channels-last", "fused")},
        ("onnxruntime", "device"): "takes and returns host arrays: pageable rows only",
        ("onnxruntime", "pinned"): "takes and returns host arrays: pageable rows only",
    }
    for row in rows:
        assert set(row) >= MODEL_ROW_KEYS, row
        if row["status"] == "ok":
            assert row["rel_err"] < 1e-5, row
            assert row["images_per_s"] == pytest.approx(row["batch"] / 1e-3)
            assert row["timing"] == "wall"


class _CountingModel:
    """A backend split as bench.runners does, counting how often each half runs."""

    def __init__(self):
        self.staged = self.forwarded = 0

    def stage(self, batch):
        self.staged += 1
        return batch.to(torch.float64)

    def forward(self, x):
        self.forwarded += 1
        return x.sum(dim=(1, 2, 3))


def test_device_input_is_staged_once_and_pageable_input_every_call():
    cpu = torch.device("cpu")
    batch = torch.randn(2, 3, 4, 4)
    for mode, staged in (("device", 1), ("pageable", 3)):
        counting = _CountingModel()
        call = runners.timed_call(runners.Runner(cpu, counting.stage, counting.forward), mode, batch)
        outputs = [call() for _ in range(3)]
        assert (counting.staged, counting.forwarded) == (staged, 3), mode
        # "device" leaves the logits as the forward made them; "pageable" returns float32 on the host.
        assert outputs[0].dtype == (torch.float64 if mode == "device" else torch.float32)
        torch.testing.assert_close(outputs[-1].double(), batch.double().sum(dim=(1, 2, 3)))


def test_bench_ms_wall_reports_quantiles_in_order():
    result = common.bench_ms(lambda: torch.randn(64, 64) @ torch.randn(64, 64), common.WALL, reps=7)
    assert (result["reps"], result["timing"]) == (7, "wall")
    assert 0 < result["p20_ms"] <= result["median_ms"] <= result["p80_ms"]


def test_bench_ms_wall_times_at_least_five_calls_past_its_budget():
    result = common.bench_ms(lambda: torch.randn(64, 64) @ torch.randn(64, 64), common.WALL, budget_s=0)
    assert result["reps"] == 5


def test_every_timing_has_its_explanation():
    assert common.device_timing(torch.device("cpu"), graph=True) == common.WALL
    assert common.device_timing(torch.device("cuda")) == common.CUDA_EVENTS
    assert common.device_timing(torch.device("cuda"), graph=True) == common.CUDA_GRAPH
    with pytest.raises(ValueError, match="timing must be one of"):
        common.bench_ms(lambda: None, "guess")


def test_compile_fresh_compiles_every_module_past_dynamos_recompile_limit():
    # A block class compiled for more shapes than the limit allows: each one must still get its own graph, or the
    # compile rows past the limit would time eager (Dynamo's fallback).
    graphs = []

    def counting_backend(graph_module, example_inputs):
        graphs.append({tuple(tensor.shape) for tensor in example_inputs})
        return graph_module.forward

    compiles = torch._dynamo.config.recompile_limit + 2
    for batch in range(1, compiles + 1):
        common.compile_fresh(torch.nn.Conv2d(3, 4, 3), backend=counting_backend)(torch.randn(batch, 3, 8, 8))
    assert len(graphs) == compiles
    assert all((batch, 3, 8, 8) in shapes for batch, shapes in enumerate(graphs, start=1))


def test_write_results_writes_json_and_a_markdown_row_per_row(tmp_path):
    rows = [
        {"label": "a", "median_ms": 1.23456, "reason": None, "timing": "cuda-graph"},
        {"label": "b|c", "median_ms": None, "reason": "needs GPU", "timing": None},
    ]
    report = {"date": "2026-11-26T00:00:00+00:00", "machine": {"gpu": None, "torch": "2.13"}, "rows": rows}
    columns = [common.Column("block", "label"), common.Column("median ms", "median_ms", "{:.2f}"),
               common.Column("note", "reason")]  # fmt: skip
    json_path, md_path = common.write_results(report, columns, tmp_path, "blocks_cpu_float32_x", "Title")
    assert json.loads(json_path.read_text()) == report
    lines = md_path.read_text().splitlines()
    assert lines[0] == "# Title"
    assert "torch 2.13" in lines[2] and "gpu" not in lines[2]
    assert lines[4] == f"- timing `cuda-graph`: {common.TIMINGS['cuda-graph']}"  # each timing used, explained once
    table = lines[lines.index("| block | median ms | note |") :]
    assert table[1] == "|---|---|---|"
    assert table[2:] == ["| a | 1.23 | — |", "| b\\|c | — | needs GPU |"]


def test_write_results_puts_the_summary_table_before_the_rows(tmp_path):
    report = {
        "date": "2026-11-26T00:00:00+00:00",
        "machine": {"torch": "2.13"},
        "rows": [{"label": "a"}],
        "summary": [{"mean": 2.0}],
    }
    _, md_path = common.write_results(
        report, [common.Column("block", "label")], tmp_path, "x", "Title", [common.Column("mean", "mean", "{:.1f}x")]
    )
    text = md_path.read_text()
    assert text.index("## Summary") < text.index("| 2.0x |") < text.index("## Rows") < text.index("| a |")


def test_collect_keeps_the_rows_measured_before_an_interrupt():
    def rows():
        yield {"status": "ok", "n": 1}
        raise KeyboardInterrupt

    collected = common.collect(rows())
    assert collected[0] == {"status": "ok", "n": 1}
    assert common.interrupted(collected)
    assert not common.interrupted(collected[:1])


def test_block_chart_is_a_png(tmp_path):
    row = {"arch": "resnet18", "name": "stem", "batch": 1, "status": "ok"}
    rows = [row | {"variant": "unfused", "speedup": 1.0}, row | {"variant": "folded", "speedup": 1.3}]
    rows.append(dict(common.INTERRUPTED))
    blocks.plot(rows, tmp_path / "chart.png", "title")
    assert (tmp_path / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_gpu_check_load_tests_a_model_its_repository_serves_without_downloads():
    script = (REPO_ROOT / "bench" / "gpu_check.sh").read_text()
    repository = re.search(r"--model-repository (\S+)", script).group(1)
    model = re.search(r"--model (\S+)", script).group(1)
    configs = {config.name: config for config in load_repository(REPO_ROOT / repository)}
    assert model in configs, f"{repository} does not define {model}"
    # The GPU host has no network: pretrained weights would leave the model not ready and the step would fail.
    assert configs[model].weights == "random"
    assert subprocess.run(["bash", "-n", REPO_ROOT / "bench" / "gpu_check.sh"]).returncode == 0


def test_run_and_write_has_every_row_on_disk_before_measuring_the_next(tmp_path):
    run = common.RunArgs(torch.device("cpu"), torch.float32, ["m"], [1], ["v"], 8, 0.0, 0.0, tmp_path)
    seen_on_disk = []

    def rows():
        for n in range(3):
            written = [json.loads(path.read_text()) for path in tmp_path.glob("*.json")]
            seen_on_disk.append([(report["complete"], len(report["rows"])) for report in written])
            yield {"status": "ok", "n": n}

    columns = [common.Column("n", "n")]
    common.run_and_write(
        rows(), run, name="t", question="q", columns=columns, title="T", plot=lambda *_: None, plot_title="P"
    )

    # A time box that kills the process outright (SIGKILL) loses at most the row being measured.
    assert seen_on_disk == [[], [(False, 1)], [(False, 2)]]
    (report,) = [json.loads(path.read_text()) for path in tmp_path.glob("*.json")]
    assert report["complete"] and [row["n"] for row in report["rows"]] == [0, 1, 2]


def test_tf32_reaches_the_fused_kernels_and_names_the_rows(untimed, monkeypatch):
    asked = []
    real_fuse = models.fuse

    def spy(model, dtype, *, allow_tf32=False):
        asked.append((dtype, allow_tf32))
        return real_fuse(model, dtype, allow_tf32=allow_tf32)

    monkeypatch.setattr(blocks.models, "fuse", spy)
    rows = list(blocks.benchmark_rows(
        ["resnet18"], [1], ["fused"], torch.float32, torch.device("cpu"),
        input_size=32, select=lambda shape: shape.name == "stem", allow_tf32=True,
    ))  # fmt: skip
    assert asked == [(torch.float32, True)]
    assert [(r["variant"], r["dtype"], r["status"]) for r in rows] == [
        ("unfused", "tf32", "ok"),
        ("fused", "tf32", "ok"),
    ]
    assert rows[1]["rel_err"] < 1e-5  # the interpreter computes IEEE float32 whatever it is asked


def test_dtype_tf32_on_the_command_line(monkeypatch, tmp_path):
    monkeypatch.setattr("sys.argv", ["bench.blocks", "--dtype", "tf32", "--device", "cpu", "--out-dir", str(tmp_path)])
    with common.ieee_float32():  # restores torch's TF32 flags afterwards
        run = common.parse_run_args(
            "doc", archs=["resnet18"], batches=[1], choices_flag="--variants", choices=["fused"],
            compile_budget_s=1.0, cpu_seconds=1.0,
        )  # fmt: skip
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32  # cuDNN's rows take TF32 too
    assert (run.dtype, run.allow_tf32, run.precision.name) == (torch.float32, True, "tf32")


@pytest.mark.parametrize("script", ["blocks", "model", "serve_throughput"])
def test_help_names_the_command_to_type(script):
    done = subprocess.run(
        [sys.executable, "-m", f"bench.{script}", "--help"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: python -m bench.{script} "), done.stdout.splitlines()[0]
    if script != "serve_throughput":
        assert "tf32" in done.stdout
    else:
        assert "--out-dir" in done.stdout


def test_progress_without_tqdm_logs_one_short_line_per_item(caplog):
    conv = torch.nn.Conv2d(3, 4, 3)  # whose repr is what a work item used to log
    items = [("shape-a", conv), ("shape-b", conv)]
    with caplog.at_level(logging.INFO, logger="bench.common"):
        assert list(common._logged(items, "blocks", label=lambda item: item[0])) == items
    assert [record.getMessage() for record in caplog.records] == ["blocks 1/2: shape-a", "blocks 2/2: shape-b"]


def _eager_conv_output_shapes(arch: str, batch: int, input_size: int) -> dict[str, tuple[int, ...]]:
    """NHWC output shape of every convolution of the eager model, by the name bench.layers gives it."""
    model = models.build(arch, weights="random", seed=0)
    shapes = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Conv2d):
            module.register_forward_hook(
                lambda _m, _a, out, name=name: shapes.__setitem__(
                    name.removesuffix(".0"), (*out.shape[:1], *out.shape[2:], out.shape[1])
                )
            )
    with torch.inference_mode():
        model(torch.randn(batch, 3, input_size, input_size))
    return shapes


def test_layer_breakdown_has_every_convolution_with_its_shape_and_kind():
    rows = layers.layer_rows("digits_resnet", 3, torch.float32, torch.device("cpu"), 32, reps=1)
    convs, totals = rows[:-3], rows[-3:]
    assert {row["layer"]: row["out_shape"] for row in convs} == _eager_conv_output_shapes("digits_resnet", 3, 32)
    assert [row["layer"] for row in totals] == ["all convolutions", "other kernels", "forward"]
    kinds = {row["layer"]: row["kind"] for row in convs}
    assert kinds["layer2.0.conv1"] == "3x3/2 +relu"
    assert kinds["layer2.0.conv2"] == "3x3/1 +residual +relu"
    assert kinds["layer2.0.downsample"] == "1x1/2"
    for row in convs:
        assert row["status"] == "ok" and row["timing"] == "profiler-cpu", row
        assert row["median_ms"] > 0 and row["tflops"] > 0, row
        assert row["config"] is None and row["chosen"].startswith("interpreter"), row  # no autotuning on a CPU
    # One pass: the convolutions' row is their sum, and with the rest it makes the forward.
    all_convs, others, forward = (row["median_ms"] for row in totals)
    assert all_convs == pytest.approx(sum(row["median_ms"] for row in convs))
    assert all_convs + others == pytest.approx(forward) and 0 < all_convs < forward


GPU_DTYPE, GPU_TOLERANCE = torch.bfloat16, 2e-2


@pytest.mark.gpu
def test_gpu_block_rows_are_timed_inside_a_cuda_graph():
    rows = list(blocks.benchmark_rows(
        ["digits_resnet"], [2], ["unfused", "folded", "fused"], GPU_DTYPE, torch.device("cuda"),
        input_size=32, select=lambda shape: shape.name in ("stem", "layer2.0"),
    ))  # fmt: skip
    assert len(rows) == 2 * 3
    for row in rows:
        assert row["status"] == "ok", row
        assert row["timing"] == "cuda-graph" and 0 < row["p20_ms"] <= row["median_ms"] <= row["p80_ms"], row
        assert row["rel_err"] < GPU_TOLERANCE, row


@pytest.mark.gpu
def test_gpu_model_rows_run_from_device_pinned_and_pageable_memory():
    kinds = ["eager-channels-last", "fused", "fused-graphs"]
    cuda = torch.device("cuda")
    rows = list(model_bench.benchmark_rows(["digits_resnet"], [1, 5], kinds, GPU_DTYPE, cuda, input_size=32))
    assert len(rows) == 3 * 2 * 3
    for row in rows:
        assert set(row) >= MODEL_ROW_KEYS, row
        assert row["status"] == "ok", row
        assert row["timing"] == ("cuda-events" if row["input"] == "device" else "wall"), row
        assert row["rel_err"] < GPU_TOLERANCE, row


@pytest.mark.gpu
def test_gpu_graphed_runner_gives_the_modules_logits_from_every_input():
    module = models.build("digits_resnet", weights="random", seed=0).cuda().eval()
    runner = runners.graphed_runner(module, torch.device("cuda"))
    with torch.inference_mode():
        for batch in (3, 1, 3):  # a second graph, then the first one again
            x = torch.randn(batch, 3, 32, 32)
            expected = module(x.cuda()).cpu()
            for mode in runners.INPUTS:
                logits = runners.timed_call(runner, mode, x)().float().cpu()
                torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4, msg=mode)


@pytest.mark.gpu
def test_gpu_layer_breakdown_attributes_cuda_kernels_and_configs_to_every_convolution():
    rows = layers.layer_rows("digits_resnet", 2, GPU_DTYPE, torch.device("cuda"), 32, reps=3)
    convs, (all_convs, _, forward) = rows[:-3], rows[-3:]
    assert {row["layer"] for row in convs} == set(_eager_conv_output_shapes("digits_resnet", 2, 32))
    for row in convs:
        assert row["timing"] == "profiler-cuda" and row["median_ms"] > 0, row
        assert row["autotuner"].startswith("conv_bn_act") and row["config"], row
        assert row["chosen"] in ("tuned", "cached"), row
    assert 0 < all_convs["median_ms"] <= forward["median_ms"]
