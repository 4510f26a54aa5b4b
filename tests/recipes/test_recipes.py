"""Each recipe trains a few steps under every precision; the real-data loaders read tiny files written here."""

import csv
import json
import math
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from hydra.utils import instantiate

from lightning_mp.cli import compare, compose, main, train, verdict
from lightning_mp.cli.compare import _finished_run, comparison_markdown, comparison_table
from lightning_mp.cli.verdict import judge, summary
from lightning_mp.recipes.common import lr_factor
from lightning_mp.recipes.nlp import TextData, generate_sentences, read_text_csv
from lightning_mp.recipes.speech import SpeechData, load_wav_folder
from lightning_mp.recipes.speech.model import LogMel
from lightning_mp.recipes.vision import VisionData, load_cifar10

ROOT = Path(__file__).resolve().parents[2]

TINY = {
    # fp16 matmul on CPU is 10-300x slower than fp32: keep every network tiny here. Three batches per
    # epoch, so trainer.max_steps=3 ends on an epoch boundary and validation (early stopping's metric) runs.
    "vision": ["model.net.width=8", "data.train_size=48", "data.val_size=32", "data.batch_size=16"],
    "nlp": ["model.net.dim=16", "model.net.layers=1", "data.train_size=48", "data.val_size=32", "data.batch_size=16"],
    "speech": ["model.net.width=8", "data.train_size=24", "data.val_size=16", "data.batch_size=8"],
}
COMMON = ["trainer.max_steps=3", "trainer.max_epochs=1", "callbacks.progress_bar=null", "logger=csv"]


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("recipe", ["vision", "nlp", "speech"])
def test_recipe_trains_under_each_precision(recipe, precision, tmp_path):
    cfg = compose([f"recipe={recipe}", f"precision={precision}", f"output_dir={tmp_path}", *COMMON, *TINY[recipe]])
    result = train(cfg)
    assert result["optimizer_steps"] == 3
    assert result["val_acc"] is not None and 0.0 <= result["val_acc"] <= 1.0
    assert json.loads((tmp_path / "result.json").read_text()) == result
    assert (tmp_path / "checkpoints" / "last.ckpt").exists()
    assert list(tmp_path.glob("csv/version_0/precision_report.json"))


def test_resume_from_last_checkpoint_continues(tmp_path):
    args = ["recipe=nlp", "precision=bf16", f"output_dir={tmp_path}", *COMMON, *TINY["nlp"], "trainer.max_steps=-1"]
    train(compose(args))  # one epoch: 3 steps
    result = train(compose([*args, "trainer.max_epochs=2", "ckpt_path=last"]))
    assert result["optimizer_steps"] == 6, "the step count continues from the checkpoint (3 + 3)"


def test_the_learning_rate_warms_up_then_follows_torchs_cosine_to_zero_at_the_last_step():
    asked = []
    factor = lr_factor(warmup_steps=4, total_steps=lambda: asked.append(1) or 20)
    assert [factor(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0] and asked == []  # read after warm-up only
    param = torch.nn.Parameter(torch.zeros(1))
    reference = torch.optim.lr_scheduler.CosineAnnealingLR(torch.optim.SGD([param], lr=1.0), T_max=16)
    expected = []
    for _ in range(17):
        expected.append(reference.get_last_lr()[0])
        reference.step()
    assert [factor(s) for s in range(4, 21)] == pytest.approx(expected, abs=1e-12)
    assert factor(20) == pytest.approx(0.0, abs=1e-12) and asked == [1]  # asked once
    assert factor(10_000) == pytest.approx(0.0, abs=1e-12)  # past the end: stays at zero
    assert lr_factor(warmup_steps=4, total_steps=float("inf"))(100) == 1.0  # no end known: constant


def test_speech_frontend_overflows_fp16_and_is_promoted():
    # A loud clip's power spectrum exceeds fp16's range inside the mel projection: the case for fallback.
    wave = torch.sin(torch.linspace(0, 2000, 8000)).unsqueeze(0) * 40
    with torch.autocast("cpu", dtype=torch.float16):
        assert not torch.isfinite(LogMel()(wave)).all()
    assert torch.isfinite(LogMel()(wave)).all()


# ------------------------------------------------------------------------------------------- data
def test_generated_sentences_need_more_than_single_words():
    texts, labels = generate_sentences(400, seed=0)
    assert generate_sentences(400, seed=0) == (texts, labels), "deterministic"
    by_word = {}
    for text, label in zip(texts, labels):
        for word in set(text.split()):
            by_word.setdefault(word, set()).add(label)
    assert by_word["good"] == {0, 1} and by_word["awful"] == {0, 1}, "negation and 'but' flip single words"
    assert 0.35 < sum(labels) / len(labels) < 0.65


def write_cifar(root, per_batch=8):
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8), b"labels": list(range(per_batch))}
        with open(root / name, "wb") as f:
            pickle.dump(batch, f)


def test_cifar10_loader_reads_python_batches(tmp_path):
    write_cifar(tmp_path)
    (train_x, train_y), (test_x, test_y) = load_cifar10(tmp_path)
    assert train_x.shape == (40, 3, 32, 32) and test_x.shape == (8, 3, 32, 32)
    assert train_y.tolist() == list(range(8)) * 5
    assert train_x.mean(dim=(0, 2, 3)).abs().max() < 1e-5, "normalised per channel"
    data = VisionData(root=str(tmp_path), num_classes=10)
    data.setup()
    assert len(data.train_set) == 40


def test_corrupt_cifar_batch_is_a_clear_error(tmp_path):
    write_cifar(tmp_path)
    (tmp_path / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="test_batch is not a CIFAR-10 python batch"):
        load_cifar10(tmp_path)


class _Exploit:
    """Unpickling this calls os.system: what a crafted data_batch_1 could do to pickle.load."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_cifar_batch_that_would_run_code_is_refused_without_running_it(tmp_path):
    write_cifar(tmp_path)
    marker = tmp_path / "pwned"
    with open(tmp_path / "data_batch_1", "wb") as f:
        pickle.dump({b"data": _Exploit(marker), b"labels": [0]}, f)
    with pytest.raises(ValueError, match=r"data_batch_1 is not a CIFAR-10 python batch .*refused to load posix.system"):
        load_cifar10(tmp_path)
    assert not marker.exists(), "the file's code never ran"


@pytest.mark.parametrize("suffix", [".csv", ".tsv"])
def test_text_loader_reads_ag_news_layout(tmp_path, suffix):
    delimiter = "\t" if suffix == ".tsv" else ","
    rows = [
        ("3", "Wall St. Bears Claw Back", "Short-sellers are seeing green again."),
        ("1", "Talks", "Peace talks resume."),
    ]
    for name in ("train", "test"):
        with open(tmp_path / f"{name}{suffix}", "w", newline="") as f:
            csv.writer(f, delimiter=delimiter).writerows(rows * 4)
    texts, labels = read_text_csv(tmp_path / f"train{suffix}")
    assert texts[0] == "Wall St. Bears Claw Back Short-sellers are seeing green again."
    assert labels[:2] == [1, 0], "labels mapped to 0..K-1 in sorted order"
    data = TextData(root=str(tmp_path), num_classes=2, max_length=8)
    data.setup()
    ids, target = data.train_set[0]
    assert ids.shape == (8,) and ids[0] > 1 and target == 1


def test_corrupt_csv_is_a_clear_error(tmp_path):
    (tmp_path / "train.csv").write_text("3\n")
    with pytest.raises(ValueError, match=r"train.csv:1: expected 'label, text'"):
        read_text_csv(tmp_path / "train.csv")


@pytest.mark.parametrize("header", ["Class Index,Title,Description", "label,text", "sentiment,review"])
def test_a_header_row_is_recognised_and_skipped(tmp_path, header):
    body = "3,Wall St. Bears,Short-sellers\n1,Talks,Peace talks resume.\n3,Oil,Prices up\n"
    (tmp_path / "train.csv").write_text(f"{header}\n{body}")
    texts, labels = read_text_csv(tmp_path / "train.csv")
    assert len(texts) == 3 and labels == [1, 0, 1], "two classes, not three: the header is not a class"


def test_an_unterminated_quote_is_refused_with_its_line(tmp_path):
    (tmp_path / "train.csv").write_text('1,fine\n2,"never closed\n1,swallowed\n2,also swallowed\n')
    with pytest.raises(ValueError, match=r"train.csv:2: .*(unterminated quote|not a valid CSV row)"):
        read_text_csv(tmp_path / "train.csv")


def test_a_binary_file_is_refused_with_its_name(tmp_path):
    (tmp_path / "train.csv").write_bytes(b"1,ok\n\xff\xfe\x00\x81 binary")
    with pytest.raises(ValueError, match=r"train.csv: not a UTF-8 text file"):
        read_text_csv(tmp_path / "train.csv")


def write_wavs(root, rate=16000):
    for label, freq in (("yes", 300.0), ("no", 600.0)):
        (root / label).mkdir(parents=True)
        for i in range(5):
            t = np.arange(int(rate * 0.5)) / rate
            soundfile.write(root / label / f"clip{i}.wav", 0.5 * np.sin(2 * np.pi * freq * t), rate)
    (root / "validation_list.txt").write_text("yes/clip0.wav\nno/clip0.wav\n")


def test_wav_folder_loader_resamples_pads_and_splits(tmp_path):
    write_wavs(tmp_path)
    (train_x, train_y), (val_x, val_y), labels = load_wav_folder(tmp_path, sample_rate=8000)
    assert labels == ["no", "yes"]
    assert train_x.shape == (8, 8000) and val_x.shape == (2, 8000)
    assert train_x[:, 4000:].abs().max() == 0, "half a second padded to one"
    assert sorted(val_y.tolist()) == [0, 1]
    data = SpeechData(root=str(tmp_path), num_classes=2)
    data.setup()
    assert len(data.val_set) == 2


def test_corrupt_wav_and_empty_folder_are_clear_errors(tmp_path):
    write_wavs(tmp_path)
    (tmp_path / "yes" / "clip1.wav").write_bytes(b"RIFF garbage")
    with pytest.raises(ValueError, match=r"clip1.wav is not a readable WAV file"):
        load_wav_folder(tmp_path)
    empty = tmp_path / "empty"
    (empty / "yes").mkdir(parents=True)
    with pytest.raises(ValueError, match="has no .wav files"):
        load_wav_folder(empty)


def test_num_classes_must_match_the_data(tmp_path):
    write_wavs(tmp_path)
    with pytest.raises(ValueError, match=r"data.num_classes=12 but the data has 2 classes"):
        SpeechData(root=str(tmp_path)).setup()


# ---------------------------------------------------------------------------------------- compare, CLI
@pytest.mark.slow
def test_compare_produces_the_table(tmp_path, capsys):
    precisions = "precisions=fp32,bf16-mixed,bf16-true"
    args = ["recipe=nlp", precisions, "seeds=2", f"output_dir={tmp_path}/run", *COMMON, *TINY["nlp"]]
    rows = compare(args)
    assert [(r["precision"], r["seed"]) for r in rows] == [
        ("fp32", 0), ("fp32", 1), ("bf16", 0), ("bf16", 1), ("bf16-true", 0), ("bf16-true", 1)
    ]  # fmt: skip
    low = [r for r in rows if r["precision"] == "bf16-true"]
    rows = [r for r in rows if r["precision"] != "bf16-true"]
    assert all(r["best_val_acc"] is not None for r in rows), "the best validation accuracy is kept per run"
    table = (tmp_path / "compare" / "compare.md").read_text()
    assert "| precision | seeds | final val acc | vs fp32 (detectable) | best val acc |" in table
    assert "| fp32 | 2 |" in table and "| bf16 | 2 |" in table and "reference" in table and "+-" in table
    assert "verdict: per metric (final and best validation accuracy, final and best held-out loss)" in table
    model = instantiate(compose(["recipe=nlp", *TINY["nlp"]]).model)
    weights = sum(p.numel() for p in model.parameters())
    for row in rows:  # what the table's cost columns and the plot are made of, measured in each run
        assert row["history"] and row["history"][-1]["val_loss"] == pytest.approx(row["val_loss"])
        assert row["best_val_loss"] == min(p["val_loss"] for p in row["history"])
        assert row["state_bytes"]["weights"] == row["state_bytes"]["gradients"] == 4 * weights
        assert row["state_bytes"]["optimizer_state"] == 2 * row["state_bytes"]["weights"]  # AdamW: two moments
        assert row["ms_per_step"] > 0
    for row in low:  # bf16 weights, gradients and moments, optimi's bf16 Kahan buffer (master_weights="auto")
        state = row["state_bytes"]
        assert state["weights"] == state["gradients"] == state["compensation"] == 2 * weights
        assert state["optimizer_state"] == 4 * weights and state["share_of_fp32"] == pytest.approx(10 / 16)
    assert "| bf16-true |" in table and "| state vs fp32 |" in table and "| 62% |" in table
    assert (tmp_path / "compare" / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "compare" / "compare.json").read_text()) == [*rows, *low]
    assert (tmp_path / "compare" / "fp32" / "seed=1" / "result.json").exists()
    assert "precision comparison, 2 seed(s) each" in capsys.readouterr().out
    assert main(["compare", *args]) == 2, "an earlier comparison is not replaced without overwrite=true"

    # interrupted during its last run: the same command trains only that run again and keeps the finished ones
    (tmp_path / "compare" / "compare.json").unlink()
    (tmp_path / "compare" / "bf16" / "seed=1" / "result.json").unlink()
    capsys.readouterr()
    resumed = compare(args)
    out = capsys.readouterr().out
    assert out.count("kept, finished earlier with the same config") == 5
    assert "[4/6] nlp under bf16, seed 1 -> " in out
    assert resumed[:3] == rows[:3] and resumed[3]["val_loss"] == pytest.approx(rows[3]["val_loss"], abs=1e-6)
    # a run whose config differs in anything (here one data setting) is trained again, not mixed in
    run_dir = tmp_path / "compare" / "fp32" / "seed=0"
    same = [o for o in args if not o.startswith(("precisions=", "seeds="))]
    same += ["precision=fp32", "seed=0", f"output_dir='{run_dir}'"]
    assert _finished_run(run_dir, same)["val_loss"] == rows[0]["val_loss"]
    assert _finished_run(run_dir, [*same, "data.val_size=40"]) is None


def _runs(accs, bests=None, losses=None, seeds=None):
    """Runs of one precision: final and best accuracy, final (= best) loss, per seed."""
    losses = losses or [None] * len(accs)
    seeds = seeds if seeds is not None else range(len(accs))
    return [
        {"seed": s, "val_acc": a, "best_val_acc": b, "val_loss": loss, "best_val_loss": loss}
        for s, a, b, loss in zip(seeds, accs, bests or accs, losses)
    ]


def test_the_verdict_follows_its_stated_rule():
    fp32 = _runs([0.90, 0.92, 0.94])  # mean 0.92, sd 0.02
    assert verdict(fp32, fp32) == "reference"
    # Seeds pair the runs: a constant per-seed difference has no spread, and the 0.005 floor decides.
    assert verdict(_runs([0.91, 0.93, 0.95]), fp32).startswith("better than fp32: final val acc +0.010")
    assert verdict(_runs([0.919, 0.921, 0.94]), fp32) == "within noise of fp32"
    assert verdict(_runs([0.80, 0.82, 0.84]), fp32).startswith("worse than fp32: final val acc -0.100")
    assert verdict(_runs([0.92, 0.92, 0.92], [0.70, 0.71, 0.72]), fp32).startswith("worse than fp32: best val acc")
    assert verdict(_runs([0.92]), fp32) == "one seed: no verdict (use seeds=3)"
    # Unpaired (other seeds): the standard error of two independent means, 2 x 0.0163 = 0.033 here.
    assert verdict(_runs([0.91, 0.93, 0.95], seeds=[7, 8, 9]), fp32) == "within noise of fp32"


def test_the_loss_decides_where_the_accuracy_saturates():
    fp32 = _runs([1.0, 1.0, 1.0], losses=[0.050, 0.052, 0.054])
    worse = _runs([1.0, 1.0, 1.0], losses=[0.080, 0.083, 0.081])
    text = verdict(worse, fp32)
    assert text.startswith("worse than fp32: final val loss +0.029"), text
    judgements = {j.metric.key: j for j in judge(worse, fp32)}
    assert judgements["val_acc"].outcome == "within noise" and judgements["val_loss"].outcome == "worse"
    assert judgements["val_loss"].paired and judgements["val_loss"].detectable < 0.01
    assert summary(judge(_runs([1.0, 1.0, 1.0], losses=[0.045, 0.047, 0.049]), fp32))[0].startswith("better")


def test_the_table_shows_what_decided_and_the_smallest_detectable_difference():
    rows = [{**r, "precision": "fp32"} for r in _runs([0.90, 0.92, 0.94], losses=[0.30, 0.28, 0.26])]
    rows += [{**r, "precision": "fp16"} for r in _runs([0.80, 0.83, 0.84], losses=[0.45, 0.40, 0.41])]
    fp32, fp16 = comparison_table(rows)
    assert fp32["verdict"] == "reference" and fp32["d_val_acc"] == "reference"
    assert fp16["verdict"].startswith("worse than fp32") and fp16["decided_by"] == "final val acc"  # 14 vs 7 x
    assert fp16["d_val_acc"].startswith("-0.097 (") and fp16["d_val_loss"].startswith("+0.140 (")
    markdown = comparison_markdown([fp32, fp16])
    assert "| precision | seeds | final val acc | vs fp32 (detectable) |" in markdown
    assert "| precision | samples/s | speed vs fp32 | ms/step | peak MB | weights MB |" in markdown


def test_the_verdict_says_worse_on_a_committed_comparison_that_is_worse():
    """``benchmarks/results/compare_nlp.json``: fp16 with its loss scale pinned at 2^-8 (small gradients
    underflow) against fp32 and default fp16, three seeds each (see benchmarks/RESULTS.md)."""
    rows = json.loads((ROOT / "benchmarks" / "results" / "compare_nlp.json").read_text())
    groups = {}
    for r in rows:
        groups.setdefault(r["precision"], []).append(r)
    assert all(math.isfinite(r["val_loss"]) for r in groups["fp16_underflow"]), "worse, not diverged"
    assert verdict(groups["fp16_underflow"], groups["fp32"]).startswith("worse than fp32")
    assert verdict(groups["fp16"], groups["fp32"]) == "within noise of fp32"


@pytest.mark.parametrize("precision", ["fp8", "int8"])
def test_low_bit_precisions_train_from_the_cli(precision, tmp_path):
    pytest.importorskip("torchao")
    wide = ["recipe=nlp", *TINY["nlp"], "model.net.dim=64"]  # 64 x 128 feed-forward layers: eligible, not tiny
    result = train(compose([*wide, *COMMON, f"precision={precision}", f"output_dir={tmp_path}"]))
    assert result["resolved_precision"] == f"{precision}-mixed" and result["speed_emulated"] is True
    assert result["low_bit_layers"] == ["net.encoder.layers.0.linear2"]  # linear1 is the first Linear of the model
    assert result["low_bit_moved"] == [] and math.isfinite(result["val_loss"])


def test_low_bit_without_torchao_is_one_line_naming_the_extra(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "torchao", None)  # what an environment without it raises on import
    assert main(["train", "precision=fp8", f"output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "lightning-mp: error: AdaptiveMP(precision='fp8-mixed') needs torchao: pip install"
        ' "lightning-mp[fp8]" (torchao>=0.18).'
    )


def test_compare_refuses_unknown_precisions(capsys):
    assert main(["compare", "precisions=fp32,fp4"]) == 2
    assert "precisions='fp32,fp4' is invalid" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("lightning-mp") is None, reason="console script not installed")
def test_console_script_runs_from_an_unrelated_directory(tmp_path):
    command = [
        "lightning-mp",
        "train",
        "experiment=quick",
        "recipe=nlp",
        "precision=bf16",
        *TINY["nlp"],
        "callbacks.progress_bar=null",
        "logger=csv",
    ]
    proc = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((tmp_path / "outputs" / "nlp" / "bf16" / "result.json").read_text())["precision"] == "bf16"
    bad = subprocess.run(["lightning-mp", "train", "recipe=vizion"], cwd=tmp_path, capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr


@pytest.mark.parametrize(
    ("precision", "remedy", "bytes_share"),
    [("bf16-true", "null", 0.5), ("bf16-true", "kahan", 0.625), ("fp16-true", "auto", None)],
)
def test_low_precision_weights_train_from_the_cli_with_their_memory_and_lost_updates(
    precision, remedy, bytes_share, tmp_path
):
    pytest.importorskip("optimi")
    overrides = [*COMMON, f"precision={precision}", f"precision.master_weights={remedy}", "+precision.stats_every=1"]
    result = train(compose(["recipe=nlp", *TINY["nlp"], *overrides, f"output_dir={tmp_path}"]))
    assert result["resolved_precision"] == precision.replace("fp16", "16") and math.isfinite(result["val_loss"])
    assert result["master_weights"] == {"null": None, "auto": "fp32"}.get(remedy, remedy)
    state = result["state_bytes"]
    if bytes_share is not None:  # bf16 weights and gradients, AdamW's moments in bf16, a bf16 Kahan buffer
        assert state["share_of_fp32"] == pytest.approx(bytes_share, abs=0.01)
    else:  # fp16 weights, fp32 masters with their fp32 gradients and moments (LayerNorms stay fp32)
        assert state["master_copies"] > 0 and state["share_of_fp32"] > 1.0
    assert result["lost_update_history"]  # the warm-up's first learning rates are tiny: rounded away without a remedy
    assert result["lost_update_share"] > 0.5 if remedy == "null" else result["lost_update_share"] < 0.01


def test_a_bad_remedy_is_one_line_naming_the_choices(capsys, tmp_path):
    assert main(["train", "precision=bf16-true", "precision.master_weights=bf16", f"output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lightning-mp: error: AdaptiveMP(master_weights='bf16') is invalid: must be one of")
    assert len(err.splitlines()) == 1
