"""The command line ``python -m pyro_structsel``: outputs, their content, bad arguments."""

from __future__ import annotations

import csv
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from pyro_structsel.cli import main

CANDIDATES = {"relu", "tanh", "sigmoid", "identity"}
# A tiny run: the quick mode with even fewer steps and evidence draws.
TINY = ["--quick", "--steps", "30", "--evidence-samples", "20", "--no-progress"]


def _strict_json(path: Path) -> dict:
    def no_constant(name: str) -> None:
        raise AssertionError(f"results.json holds {name}, which is not JSON")
    return json.loads(path.read_text(encoding="utf-8"), parse_constant=no_constant)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, Path, str]:
    out = tmp_path_factory.mktemp("cli") / "out"
    capture = subprocess.run([sys.executable, "-m", "pyro_structsel", *TINY, "--out", str(out)],
                             capture_output=True, text=True, timeout=300)
    assert capture.returncode == 0, capture.stderr
    return capture.returncode, out, capture.stdout


def test_module_writes_every_output(tiny_run: tuple[int, Path, str]) -> None:
    _, out, stdout = tiny_run
    for name in ("results.json", "summary.csv", "losses.csv", "losses.png", "posterior.png",
                 "idata.nc"):
        assert (out / name).is_file(), name
        assert (out / name).stat().st_size > 0, name
    assert (out / "losses.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob("*.tmp")), "a temporary file was left behind"
    import arviz as az

    idata = az.from_netcdf(out / "idata.nc")
    assert {"posterior", "log_likelihood", "observed_data"} <= set(idata.groups())
    assert "layer1" in idata.posterior and "layer2" in idata.posterior
    assert "TEST accuracy" in stdout
    assert "layer1" in stdout and "layer2" in stdout


def test_results_json_content(tiny_run: tuple[int, Path, str]) -> None:
    _, out, stdout = tiny_run
    results = _strict_json(out / "results.json")
    assert set(results["structure"]) == {"layer1", "layer2"}
    assert set(results["structure"].values()) <= CANDIDATES
    for site, probs in results["relaxed_probabilities"].items():
        assert set(probs) == CANDIDATES
        assert math.isclose(sum(probs.values()), 1.0, abs_tol=1e-4)
        assert max(probs, key=probs.get) == results["relaxed_structure"][site]
    for site, probs in results["probabilities"].items():  # from the discrete check
        assert set(probs) == CANDIDATES
        assert math.isclose(sum(probs.values()), 1.0, abs_tol=1e-4)
    check = results["discrete_check"]
    # a network of 3466 weights: warm-started ELBO fits (the full GGN is for 2000 at most)
    assert check["method"] == "elbo" and check["num_steps"] == 30
    assert check["num_fits"] == len(check["structures"]) >= 7  # the pick and its 6 neighbours
    assert check["structures"][0]["structure"] == results["structure"]
    assert "Discrete check" in stdout
    scores = results["scores"]
    for key in ("log_evidence[elbo]", "parametric_complexity", "structural_complexity",
                "description_length_bits", "num_parameters", "num_superpositions"):
        assert isinstance(scores[key], (int, float)), key
    assert scores["num_superpositions"] == 3
    assert 0.0 <= results["test_accuracy"] <= 1.0
    assert results["num_steps"] == 30
    assert results["config"]["quick"] is True
    assert results["data"]["num_test"] + results["data"]["num_train"] == 1797
    assert f"{results['test_accuracy']:.4f}" in stdout


def test_tables(tiny_run: tuple[int, Path, str]) -> None:
    _, out, _ = tiny_run
    summary = pd.read_csv(out / "summary.csv")
    assert list(summary.columns) == ["site", "option", "probability", "relaxed_probability",
                                     "posterior_mean", "chosen"]
    assert len(summary) == 8
    assert summary.groupby("site")["chosen"].sum().tolist() == [1, 1]
    with open(out / "losses.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["step", "loss", "elbo"]
    assert len(rows) == 31
    assert all(math.isfinite(float(r[1])) and float(r[1]) == -float(r[2]) for r in rows[1:])


def test_in_process_run_is_reproducible_and_resumes_from_checkpoint(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    threads = torch.get_num_threads()
    checkpoint = tmp_path / "fit.ckpt"
    # the checkpoint is of the relaxed fit: the discrete check (tested above) is left out
    argv = [*TINY, "--steps", "20", "--hidden", "16", "--seed", "3", "--no-discrete-check",
            "--checkpoint", str(checkpoint)]
    assert main([*argv, "--out", str(tmp_path / "a")]) == 0
    assert torch.get_num_threads() == threads  # --threads is restored afterwards
    assert checkpoint.is_file()
    # the same arguments again: resumes at the last step, ends with the same result
    assert main([*argv, "--out", str(tmp_path / "b")]) == 0
    first = _strict_json(tmp_path / "a" / "results.json")
    second = _strict_json(tmp_path / "b" / "results.json")
    for key in ("structure", "probabilities", "scores", "test_accuracy"):
        assert first[key] == second[key], key
    assert first["config"]["hidden"] == [16, 16]
    assert "TEST accuracy" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], r"--steps: expected a positive integer, got '0'"),
    (["--steps", "many"], r"--steps: expected a positive integer"),
    (["--lr", "-0.1"], r"--lr: expected a positive number"),
    (["--prior", "laplace"], r"--prior: invalid choice: 'laplace'"),
    (["--activations", "relu", "swish"], r"--activations: invalid choice: 'swish'"),
    (["--activations", "relu", "relu"], r"--activations: expected at least two distinct"),
    (["--hidden", "8", "8", "8"], r"--hidden: expected one or two widths"),
    (["--temperature", "0.5"], r"--temperature: only used with --prior concrete"),
    (["--test-size", "1.5"], r"--test-size: expected a fraction in \(0, 1\)"),
    (["--no-such-option"], r"unrecognized arguments: --no-such-option"),
])
def test_bad_arguments_exit_2_with_a_clear_message(
        argv: list[str], message: str, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "usage: pyro-structsel" in err
    assert re.search(message, err), err
    assert not (tmp_path / "out").exists()


def test_bad_checkpoint_exits_1_naming_it(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    checkpoint = tmp_path / "other.ckpt"
    torch.save({"something": "else"}, checkpoint)
    assert main([*TINY, "--checkpoint", str(checkpoint), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("pyro-structsel: error:")
    assert "is not a pyro_structsel checkpoint" in err


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for option in ("--quick", "--steps", "--seed", "--hidden", "--prior", "--lr",
                   "--batch-size", "--no-progress", "--checkpoint", "--out"):
        assert option in out
