"""One flag name per meaning across the subcommands, the old spellings as hidden aliases, and
what this machine cannot run refused as a usage error (exit code 2), never a traceback."""
import argparse

import pytest
import torch

from diffloss_fast import cli, ops
from diffloss_fast.cli import build_parser, main
from diffloss_fast.tools.harness import prior_source

MEASURING = ("bench", "memory", "profile", "roofline")


def subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def usage_error(capsys, argv) -> str:
    """The error line of a refused command line, after checking it is a usage error."""
    with pytest.raises(SystemExit) as excinfo:
        main(argv)
    assert excinfo.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"diffloss-fast {argv[0]}: error: ")
    return last


@pytest.fixture
def no_cuda(monkeypatch):
    """A CPU-only machine, whatever this one has."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


@pytest.fixture
def no_triton(monkeypatch):
    """Triton unusable here (the test suite runs it interpreted on the CPU)."""
    monkeypatch.setattr(ops, "triton_available", lambda device: False)


def test_every_subcommand_lists_the_same_names():
    helps = {name: p.format_help() for name, p in subparsers().items()}
    for name in (*MEASURING, "train"):
        assert "--prior PATH|" in helps[name] and "--prior-config" in helps[name]
    for name in ("bench", "roofline", "train"):
        assert "--activation-checkpointing" in helps[name]
    for name in MEASURING:  # eval's --checkpoint is the trained network it restores with
        assert "--checkpoint " not in helps[name] and "--checkpoint\n" not in helps[name]
    assert "--checkpointing" not in helps["bench"]
    assert "--grad-checkpoint" not in helps["train"]


@pytest.mark.parametrize("argv, dest", [
    (["bench", "--checkpointing"], "activation_checkpointing"),
    (["bench", "--activation-checkpointing"], "activation_checkpointing"),
    (["roofline", "--checkpoint"], "activation_checkpointing"),
    (["roofline", "--activation-checkpointing"], "activation_checkpointing"),
    (["train", "--grad-checkpoint"], "activation_checkpointing"),
    (["train", "--activation-checkpointing"], "activation_checkpointing"),
])
def test_activation_checkpointing_old_and_new_spellings(argv, dest):
    assert getattr(build_parser().parse_args(argv), dest) is True
    assert getattr(build_parser().parse_args(argv[:1]), dest) is False


def test_prior_names_a_file_or_a_preset(tmp_path):
    weights = tmp_path / "prior.pt"
    weights.write_bytes(b"")
    assert prior_source("tiny", None) == (None, "tiny")
    assert prior_source(str(weights), None) == (str(weights), "adm-256-uncond")
    assert prior_source(str(weights), "tiny") == (str(weights), "tiny")
    assert prior_source(str(weights), '{"num_channels": 64}') == (str(weights),
                                                                  {"num_channels": 64})
    args = build_parser().parse_args(["profile", "--prior", str(weights),
                                      "--prior-config", "tiny"])
    assert prior_source(args.prior, args.prior_config, args.checkpoint) == (str(weights), "tiny")


def test_old_checkpoint_option_takes_prior_as_its_architecture(tmp_path):
    weights = tmp_path / "prior.safetensors"
    weights.write_bytes(b"")
    for command in ("bench", "memory", "profile"):
        args = build_parser().parse_args([command, "--prior", "tiny", "--checkpoint",
                                          str(weights)])
        assert prior_source(args.prior, args.prior_config, args.checkpoint) == (str(weights),
                                                                                "tiny")


@pytest.mark.parametrize("argv, message", [
    (["bench", "--prior", "nowhere.pt"], "nowhere.pt is neither a file nor a preset"),
    (["memory", "--prior", "nowhere.pt"], "nowhere.pt is neither a file nor a preset"),
    (["roofline", "--prior", "adm-512"], "adm-512 is neither a file nor a preset"),
    (["profile", "--prior", "tiny", "--prior-config", "tiny"], "is a preset"),
    (["bench", "--prior-config", "{oops"], "not valid JSON"),
    (["bench", "--prior-config", "adm-512"], "neither a preset"),
    (["train", "--prior", "adm-256-uncond"], "only the 'tiny' preset"),
])
def test_prior_mistakes_are_usage_errors(capsys, argv, message):
    assert message in usage_error(capsys, argv)


def test_weights_given_twice_is_a_usage_error(tmp_path, capsys):
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    a.write_bytes(b"")
    b.write_bytes(b"")
    line = usage_error(capsys, ["bench", "--prior", str(a), "--checkpoint", str(b)])
    assert "give the file once" in line


@pytest.mark.parametrize("argv", [
    ["bench", "--device", "cuda"],
    ["profile", "--device", "cuda:1"],
    ["roofline", "--time-convolutions", "--device", "cuda"],
    ["train", "--device", "cuda", "--synthetic", "rain", "--prior", "tiny"],
    ["eval", "--checkpoint", "x.safetensors", "--synthetic", "rain", "--device", "cuda"],
])
def test_a_cuda_device_on_a_cpu_machine_is_a_usage_error(no_cuda, capsys, argv):
    assert "argument --device" in usage_error(capsys, argv)


def test_a_missing_gpu_index_is_a_usage_error(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert "sees 1 CUDA device" in usage_error(capsys, ["bench", "--device", "cuda:1"])


def test_roofline_needs_no_device_unless_it_times():
    assert build_parser().parse_args(["roofline", "--device", "cpu"]).device == "cpu"


@pytest.mark.parametrize("argv, message", [
    (["bench", "--device", "cpu", "--variants", "reference", "fast-graphed"], "CUDA graphs"),
    (["profile", "--device", "cpu", "--variant", "fast-graphed"], "CUDA graphs"),
    (["bench", "--device", "cpu", "--variants", "fast-fused"], "Triton"),
    (["profile", "--device", "cpu", "--variant", "fast-fused"], "Triton"),
    (["bench", "--device", "cpu", "--backend", "triton"], "argument --backend"),
])
def test_cuda_only_variants_on_the_cpu_are_usage_errors(no_triton, capsys, argv, message):
    assert message in usage_error(capsys, argv)


def test_semantic_weight_help_names_what_skips_the_decoder():
    semantic = next(a.help for a in subparsers()["train"]._actions
                    if "--semantic-weight" in a.option_strings)
    assert "0 skips the prior's decoder" not in semantic
    assert "0 drops that term only" in semantic
    assert "--natural-weight 0 is what skips it" in semantic


def test_eval_without_targets_or_out_would_keep_nothing(capsys):
    line = usage_error(capsys, ["eval", "--checkpoint", "c.safetensors", "--input-dir", "in"])
    assert "--out" in line
    base = ["eval", "--checkpoint", "c.safetensors", "--input-dir", "in", "--device", "cpu"]
    assert build_parser().parse_args([*base, "--out", "restored"]).out == "restored"
    assert build_parser().parse_args([*base, "--target-dir", "gt"]).target_dir == "gt"


def test_checks_run_only_for_their_own_subcommand():
    parser = cli.Parser(prog="x")
    parser.add_argument("--n", type=int)
    assert parser.parse_args(["--n", "3"]).n == 3  # no check registered: plain argparse
