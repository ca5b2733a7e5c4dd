"""The README's "Run your Hugging Face model with the grid" commands, run as written on a tiny
local Llama (tests/cases/hf.py): convert, generate text on a 2x2 grid with `--hf-dir` (tokens and
text equal to transformers' greedy `generate`), tokenize a corpus, fine-tune under the grid with
`--hf-dir` (the same losses as the same command at TP=1), export to HF (transformers' logits of
the export equal megatron's of the fine-tuned checkpoint). Plus the `--hf-dir` flag expansion and
its refusals, without ranks."""

import json
import re
import shutil
import sys
from argparse import Namespace

import pytest

pytest.importorskip("transformers")

from megatron_mxn.convert.hf_config import ConversionError, megatron_flags  # noqa: E402
from megatron_mxn.convert.hf_run import check_hf_run  # noqa: E402
from megatron_mxn.megatron_lm.run_configs import expand_config_args  # noqa: E402
from tests.cases import hf  # noqa: E402
from tests.conftest import get_pool  # noqa: E402
from tests.launch import REPO, rel_diff, torchrun  # noqa: E402

SECTION = "## Run your Hugging Face model with the grid"


def readme_commands(paths: dict):
    """The section's shell commands (continuations joined, comments dropped), with $VARS
    replaced by `paths`."""
    text = (REPO / "README.md").read_text()
    section = text[text.index(SECTION):]
    section = section[:section.index("\n## ", 1)]
    [block] = re.findall(r"^```bash\n(.*?)^```", section, flags=re.S | re.M)
    out = []
    for line in block.replace("\\\n", " ").splitlines():
        line = line.split(" #")[0].strip()
        if line and not line.startswith("#"):
            for var, value in sorted(paths.items(), key=lambda kv: -len(kv[0])):
                line = line.replace(f"${var}", value)
            out.append(line.split())
    return out


def without_flags(argv, *flags):
    """argv without each of `flags` and its value."""
    out, skip = [], False
    for a in argv:
        if not skip and a not in flags:
            out.append(a)
        skip = not skip and a in flags
    return out


def run_command(argv, workdir, label, nproc_override=None):
    """A README command: `python -m megatron_mxn.convert ...` in a pool rank (its world of one),
    `torchrun --nproc-per-node N SCRIPT ...` on N forked ranks (tests.launch.torchrun)."""
    if argv[1:3] == ["-m", "megatron_mxn.convert"]:
        [r] = get_pool(1).run(hf.command_line, argv=argv[3:], cwd=str(workdir))
        assert r["status"] == 0, r["stderr"][-3000:]
        return r
    assert argv[0].endswith("torchrun") and argv[1] == "--nproc-per-node", argv
    nproc, script, args = int(argv[2]), argv[3], argv[4:]
    run = torchrun(script, nproc_override or nproc, args, workdir, timeout=300)
    for kept in ("logs", "metrics.jsonl"):  # (the next command starts without them)
        if (workdir / kept).exists():
            shutil.move(workdir / kept, workdir / f"{label}-{kept}")
    assert run.returncode == 0, run.output[-3000:] + "\n".join(run.rank_logs.values())[-6000:]
    return run


@pytest.mark.launches
def test_readme_commands_from_an_hf_directory_to_text_fine_tuning_and_back(tmp_path):
    hf_dir = tmp_path / "hf"
    cfg = hf.make_hf_model("llama", str(hf_dir))
    (tmp_path / "prompts.txt").write_text("\n".join(hf.PROMPTS) + "\n")
    shutil.copy(hf.CORPUS, tmp_path / "corpus.txt")
    paths = {"HF": str(hf_dir), "CKPT": str(tmp_path / "ckpt"),
             "FINETUNED": str(tmp_path / "finetuned"), "HF_OUT": str(tmp_path / "hf_out")}
    convert, generate, tokenize, finetune, export = readme_commands(paths)

    printed = run_command(convert, tmp_path, "convert")["stdout"]
    assert " ".join(megatron_flags(cfg)) in printed

    gen = run_command(generate, tmp_path, "generate")
    report = json.loads((tmp_path / "generated.json").read_text())
    want = hf.hf_greedy(str(hf_dir), hf.prompt_ids(str(hf_dir)))
    assert report["generated_token_ids"] == want
    assert [len(ids) for ids in want] == [8, 8, 0]  # (the third ends at once: hf.PROMPTS)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(hf_dir))
    assert report["texts"] == [tok.decode(ids) for ids in want]
    assert (report["layout"]["head_groups"], report["layout"]["tp"]) == (2, 4)
    assert report["kv_cache"] == "positions"
    # ragged prompts run 22 - 8 + 8 - 1 decode steps; each still takes 2 dim-slice collectives
    assert report["comm_collectives_per_layer_per_decode_step"]["dim-slice"] == 2.0
    assert f"[generated 1] {report['texts'][1]}" in gen.rank_logs[0]

    assert "37 documents" in run_command(tokenize, tmp_path, "tokenize")["stdout"]

    grid = run_command(finetune, tmp_path, "finetune")
    losses = grid.by_iteration("lm loss")
    assert sorted(losses) == list(range(1, 11)) and losses[10] < losses[1]
    # the same command at TP=1 on one rank: the grid trains the same model
    tp1 = without_flags(finetune, "--mxn-head-groups", "--mxn-dim-slices", "--save")
    one = run_command(tp1, tmp_path, "tp1", nproc_override=1)
    print(f"fine-tuning lm loss {losses[1]:.4f} -> {losses[10]:.4f}; grid 2x2 vs TP=1: "
          f"{rel_diff(losses, one.by_iteration('lm loss')):.1e}")
    assert rel_diff(losses, one.by_iteration("lm loss")) <= 1e-5
    assert rel_diff(grid.by_iteration("grad norm"), one.by_iteration("grad norm")) <= 1e-4

    run_command(export, tmp_path, "export")
    expected = hf.hf_logits(paths["HF_OUT"], hf.tokens())
    [r] = get_pool(1).run(hf.back_and_logits, hf_dir=str(hf_dir), ckpt=paths["FINETUNED"],
                          out_dir=str(tmp_path / "again"), expected=expected)
    assert r["different"], "fine-tuning changed no weight"
    assert r["logits_err"] <= 1e-4  # transformers on the export == megatron on the checkpoint


@pytest.fixture(scope="module")
def hf_config_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hfcfg")
    hf.hf_config("qwen3").save_pretrained(str(path))
    hf.train_tokenizer(str(path))
    return path


def test_hf_dir_expands_to_the_model_and_tokenizer_flags_first(hf_config_dir):
    model = megatron_flags(json.loads((hf_config_dir / "config.json").read_text()))
    argv = ["--hf-dir", str(hf_config_dir), "--num-layers", "1"]
    train = expand_config_args(argv)
    assert train[:len(model)] == model and train[-3:] == argv[1:] and "--seq-length" not in train
    assert ["--tokenizer-type", "HuggingFaceTokenizer"] == train[len(model):len(model) + 2]
    gen = expand_config_args(argv, section="inference")
    k = gen.index("--seq-length")
    assert gen[k + 1] == "64" and k < gen.index("--hf-dir")  # (the model's context)


def test_hf_dir_in_a_config_file(hf_config_dir, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(f"model:\n  hf-dir: {hf_config_dir}\n  seq-length: 32\n")
    argv = expand_config_args(["--config", str(config)])
    assert argv[0] == "--num-layers" and argv[-4:] == ["--hf-dir", str(hf_config_dir),
                                                       "--seq-length", "32"]


def test_hf_dir_refusals_say_what_to_do(hf_config_dir, tmp_path, monkeypatch):
    args = Namespace(hf_dir=str(hf_config_dir), load=None, max_position_embeddings=64)
    with pytest.raises(ConversionError, match="hf-to-megatron --hf-dir"):
        check_hf_run(args, training=False)
    args.load = str(tmp_path)
    with pytest.raises(ConversionError, match="holds no Megatron checkpoint"):
        check_hf_run(args, training=False)
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("release")
    monkeypatch.setattr(sys, "argv", ["pretrain", "--hf-dir", str(hf_config_dir)])
    with pytest.raises(ConversionError, match="pass --seq-length"):
        check_hf_run(args, training=True)
