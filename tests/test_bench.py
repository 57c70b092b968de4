"""``klip-med bench`` on a tiny 16x16 prior: report fields and types, the overhead arithmetic,
accumulator memory independent of the number of steps (the stored trajectory's linear in it),
bad arguments named, atomic JSON. No timed assertions: speed targets live in benchmarks."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import torch

from klip_med.bench import BenchSettings, parse_compare, run_bench, write_report
from klip_med.cli import main
from klip_med.errors import KLIPMedError
from klip_med.priors.config import PriorConfig, default_architecture, default_schedule
from klip_med.priors.diffusion import DiffusionPrior, save_prior_dir
from klip_med.priors.intensity import IntensityRule

SIZE = 16
FAST = ["--samples", "2", "--steps", "3", "--repeats", "2", "--warmup", "0"]


@pytest.fixture(scope="module")
def tiny_prior(tmp_path_factory) -> Path:
    """A 16x16 MR prior folder with random weights (MONAI zero-initialises the output layer: we
    give it small random weights too, so the network's output is not identically zero)."""
    config = PriorConfig(
        name="tiny-bench", modality="MR", image_size=SIZE, architecture=default_architecture((16, 16, 16, 16)),
        schedule=default_schedule(100), intensity=IntensityRule("mr-percentile", percentile=99.0, reference=0.8),
        weights_dtype="float32",
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        prior = DiffusionPrior(config)
        with torch.no_grad():
            for p in prior.unet.out.parameters():
                p.normal_(0.0, 0.05)
    folder = tmp_path_factory.mktemp("prior") / "tiny-bench"
    save_prior_dir(prior, config, folder)
    return folder


@pytest.fixture(scope="module")
def report(tiny_prior, tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("bench")
    path = out / "bench.json"
    assert main(["bench", "--prior", str(tiny_prior), *FAST, "--json", str(path)]) == 0
    return json.loads(path.read_text(encoding="utf-8")), out


def test_report_has_every_field_with_its_type(report):
    data, out = report
    assert [p.name for p in out.iterdir()] == ["bench.json"]  # no temporary file left behind
    expected = {
        "device": str, "device_name": str, "torch_version": str, "threads": int, "load_average": list,
        "image_size": int, "samples": int, "steps": int, "sampler": str, "batch": int,
        "seconds_per_slice": float, "slices_per_second": float, "nfe_per_second": float,
        "peak_host_bytes": int, "peak_host_method": str, "klip_overhead_fraction": float,
        "klip_overhead_isolated_fraction": float, "accumulator_peak_bytes": int,
        "deepinv_seconds_per_slice": float, "deepinv_plain_seconds_per_slice": float, "psnr_db": float,
        "deepinv_psnr_db": float, "trajectory_seconds_per_slice": float, "trajectory_bytes": int,
        "weights": str, "roofline": dict, "environment": dict, "timings": dict, "warmup_seconds": float,
    }
    for key, kind in expected.items():
        assert isinstance(data[key], kind), (key, data[key])
    assert data["device"] == "cpu" and data["peak_gpu_bytes"] is None
    assert (data["image_size"], data["samples"], data["steps"], data["sampler"], data["batch"]) == (
        SIZE, 2, 3, "fast", 1)
    assert data["weights"] == "trained"
    assert data["bf16_klip_max_rel_error"] is None  # float32 run
    assert data["same_samples_with_and_without_klip"] is True
    assert data["trajectory"]["max_relative_difference_vs_streaming"] < 1e-5
    assert data["deepinv"]["samples"] == data["samples"] == 2 and data["deepinv"]["steps"] == 3
    roof = data["roofline"]
    assert roof["fraction_of_matmul_rate"] == pytest.approx(roof["achieved_network_tflops"]
                                                            / roof["device_matmul_tflops"])
    assert data["compile"] is None and data["compile_backend"] is None


def test_rates_and_overhead_follow_from_the_recorded_timings(report):
    data, _ = report
    with_s, without_s = data["timings"]["with_klip_s"], data["timings"]["without_klip_s"]
    assert len(with_s) == len(without_s) == 2
    fractions = [(w - wo) / wo for w, wo in zip(with_s, without_s, strict=True)]
    assert data["klip_overhead_fraction"] == pytest.approx(statistics.median(fractions))
    seconds = statistics.median(with_s)
    assert data["seconds_per_slice"] == pytest.approx(seconds / data["batch"])
    assert data["slices_per_second"] == pytest.approx(data["batch"] / seconds)
    assert data["nfe_per_second"] == pytest.approx(data["steps"] * data["samples"] * data["batch"] / seconds)


def test_accumulator_memory_does_not_grow_with_steps_but_the_trajectory_does(tiny_prior):
    def bench(steps: int) -> dict:
        return run_bench(BenchSettings(prior=str(tiny_prior), samples=2, steps=steps, repeats=1, warmup=0,
                                       compare=("trajectory",)))

    four, eight = bench(4), bench(8)
    assert four["accumulator_peak_bytes"] == eight["accumulator_peak_bytes"] > 0
    per_step = 2 * 1 * SIZE * SIZE * 4  # S x C x H x W float32
    assert four["trajectory_bytes"] == 4 * per_step
    assert eight["trajectory_bytes"] == 8 * per_step


def test_other_image_size_is_an_untrained_timing_only_run(tiny_prior):
    data = run_bench(BenchSettings(prior=str(tiny_prior), image_size=32, samples=1, steps=2, batch=2,
                                   repeats=1, warmup=0, compare=(), sampler="dps"))
    assert (data["image_size"], data["weights"], data["batch"]) == (32, "random-init", 2)
    assert data["psnr_db"] is None and data["deepinv_seconds_per_slice"] is None
    assert data["trajectory_bytes"] is None


def test_bf16_reports_the_klip_map_difference(tiny_prior):
    data = run_bench(BenchSettings(prior=str(tiny_prior), samples=2, steps=3, repeats=1, warmup=0,
                                   compare=(), dtype="bfloat16"))
    error = data["bf16_klip_max_rel_error"]
    assert isinstance(error, float) and 0.0 <= error < 1.0
    assert {"float32_seconds_per_slice", "psnr_db_float32", "psnr_db_bf16"} <= set(data["bf16"])


@pytest.mark.parametrize("flags, named", [
    (["--sampler", "ddim"], "--sampler"),
    (["--image-size", "20"], "--image-size"),
    (["--compare", "deepinv,eigenscore"], "--compare"),
    (["--dtype", "float16"], "--dtype"),
    (["--samples", "0"], "--samples"),
    (["--physics", "mri:accel=0.5"], "--physics"),
    (["--device", "tpu"], "--device"),
])
def test_bad_arguments_are_named_and_exit_2(tiny_prior, flags, named, capsys):
    assert main(["bench", "--prior", str(tiny_prior), *FAST, "--compare", "none", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"klip-med: error: {named}:"), err


def test_settings_and_compare_parsing_raise_our_error():
    with pytest.raises(KLIPMedError, match=r"--sampler: expected one of \['dps', 'fast'\], found 'ddim'"):
        BenchSettings(prior="x", sampler="ddim")
    with pytest.raises(KLIPMedError, match="--compare: .*found 'foo'"):
        parse_compare("trajectory,foo")
    assert parse_compare("none") == () and parse_compare("trajectory,deepinv") == ("trajectory", "deepinv")


def test_json_is_written_atomically(tmp_path):
    path = tmp_path / "bench.json"
    write_report({"seconds_per_slice": 1.0}, path)
    with pytest.raises(TypeError):
        write_report({"seconds_per_slice": object()}, path)  # fails while writing
    assert json.loads(path.read_text(encoding="utf-8")) == {"seconds_per_slice": 1.0}
    assert [p.name for p in tmp_path.iterdir()] == ["bench.json"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bench_with_bf16_and_compile(tiny_prior, tmp_path):
    path = tmp_path / "bench.json"
    assert main(["bench", "--prior", str(tiny_prior), "--device", "cuda", *FAST, "--dtype", "bfloat16",
                 "--compile", "--channels-last", "--tf32", "--json", str(path)]) == 0
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["device"].startswith("cuda") and isinstance(data["peak_gpu_bytes"], int)
    assert data["roofline"]["matmul_dtype"] == "bfloat16"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("sampler", ["fast", "dps"])
def test_sampler_loop_does_not_synchronise_with_the_host(tiny_prior, sampler):
    """After the first step, any host sync in the sampler or the accumulator raises."""
    from klip_med import priors
    from klip_med.physics import parse_physics
    from klip_med.pipeline import KLIPSettings, make_sampler
    from klip_med.score import KLIPAccumulator

    prior = priors.load(tiny_prior, device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    physics = parse_physics("mri:accel=4,center=0.08,noise=0.01", SIZE, generator=gen, device="cuda")
    y = physics(torch.zeros(1, 1, SIZE, SIZE, device="cuda"))

    def strict_from_now_on(event) -> None:
        if event.index == 0:
            torch.cuda.set_sync_debug_mode("error")

    try:
        make_sampler(prior, KLIPSettings(steps=5, sampler=sampler)).sample(y, physics, 2, (1, SIZE, SIZE), gen,
                                               observers=[KLIPAccumulator(), strict_from_now_on])
    finally:
        torch.cuda.set_sync_debug_mode("default")


# ---------------------------------------------------------------- suites, the training probe, compile plumbing


def test_suite_runs_in_order_records_errors_and_skips_what_does_not_fit(tiny_prior, tmp_path):
    import time

    from klip_med.bench import SuiteEntry, format_table, run_suite

    fast = dict(samples=1, steps=2, repeats=1, warmup=0, compare=())
    entries = [SuiteEntry("ok", BenchSettings(prior=str(tiny_prior), **fast), note="runs"),
               SuiteEntry("broken", BenchSettings(prior=str(tmp_path / "no-prior"), **fast)),
               SuiteEntry("too-long", BenchSettings(prior=str(tiny_prior), **fast), min_seconds=1e6)]
    lines = []
    path = tmp_path / "suite.json"
    doc = run_suite(entries, path, deadline=time.time() + 600, log=lines.append, extra={"machine": "test"})
    on_disk = json.loads(path.read_text(encoding="utf-8"))
    assert on_disk == json.loads(json.dumps(doc)) and on_disk["machine"] == "test"
    assert [(e["label"], e["status"]) for e in on_disk["entries"]] == [("ok", "ok"), ("broken", "error"),
                                                                      ("too-long", "skipped")]
    assert "KLIPMedError" in on_disk["entries"][1]["error"] and "time budget" in on_disk["entries"][2]["reason"]
    row = on_disk["summary"][0]
    assert row["label"] == "ok" and row["seconds_per_slice"] == on_disk["entries"][0]["report"]["seconds_per_slice"]
    assert format_table(on_disk["summary"]).splitlines()[1].startswith("ok ")
    # a second pass appends to the same document; labels stay unique
    doc = run_suite([SuiteEntry("late", BenchSettings(prior=str(tiny_prior), **fast))], path, doc=doc, log=lines.append)
    assert [e["label"] for e in json.loads(path.read_text(encoding="utf-8"))["entries"]][-1] == "late"
    with pytest.raises(KLIPMedError, match="suite labels: expected unique labels"):
        run_suite([SuiteEntry("ok", BenchSettings(prior=str(tiny_prior)))], path, doc=doc)
    assert [p.name for p in tmp_path.iterdir()] == ["suite.json"]


def test_choose_batch_takes_the_largest_batch_that_still_helps():
    from klip_med.bench import choose_batch

    assert choose_batch([(64, 1000.0), (128, 1800.0), (256, 2000.0)])[0] == 128  # 2000 < 1.15 x 1800
    assert choose_batch([(64, 1000.0), (128, 1100.0), (256, 2400.0)])[0] == 64  # stops at the first miss
    batch, reason = choose_batch([(64, 1000.0), (128, 1800.0), (256, 3000.0)])
    assert batch == 256 and "largest tried" in reason
    assert choose_batch([(8, 5.0)]) == (8, "every larger batch helped up to the largest tried, 8 (5 images/s)")
    with pytest.raises(KLIPMedError, match="increasing batch sizes"):
        choose_batch([(128, 1.0), (64, 2.0)])


def test_training_probe_times_the_training_step(tiny_prior):
    from klip_med.bench import train_throughput

    probe = train_throughput(str(tiny_prior), "cpu", (2, 4), steps=1, warmup=1)
    assert [r["batch"] for r in probe["rows"]] == [2, 4] and probe["image_size"] == SIZE
    for row in probe["rows"]:
        assert row["images_per_second"] == pytest.approx(row["batch"] / row["seconds_per_step"])
        assert row["peak_gpu_bytes"] is None
    assert probe["chosen_batch"] in (2, 4) and probe["options"]["mixed_precision"] == "float32"
    assert probe["weights"] == "trained"
    bigger = train_throughput(str(tiny_prior), "cpu", (2,), steps=1, warmup=0, image_size=32)
    assert bigger["image_size"] == 32 and bigger["weights"] == "random-init" and bigger["chosen_batch"] == 2
    late = train_throughput(str(tiny_prior), "cpu", (2, 4), steps=1, warmup=0, deadline=0.0)
    assert [r.get("skipped") for r in late["rows"]] == ["time budget"] * 2 and late["chosen_batch"] is None


def test_cuda_graph_outputs_are_copied_out_of_their_buffers():
    """CUDA graphs reuse output buffers at the next replay and the samplers keep outputs across
    steps: under reduce-overhead the wrapper returns a copy (shown here with an aliasing network)."""
    from klip_med.bench.case import NetworkOptions

    class Passthrough(torch.nn.Module):
        def forward(self, x, t):
            return x

    x = torch.randn(2, 1, 4, 4)
    eager = NetworkOptions(Passthrough(), "cpu")
    graphs = NetworkOptions(Passthrough(), "cpu", compile_mode="reduce-overhead", compile_backend="eager")
    assert eager(x, torch.zeros(2)).data_ptr() == x.data_ptr()
    out = graphs(x, torch.zeros(2))
    assert torch.equal(out, x) and out.data_ptr() != x.data_ptr()
    with pytest.raises(KLIPMedError, match="--compile-backend: expected one of"):
        BenchSettings(prior="x", compile_backend="tvm")
