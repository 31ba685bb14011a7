"""Generation training pieces without Ray: prompt/response data, loss masks, truncation,
packing, the LM batch and loss, LoRA merged into the saved checkpoint."""

import json

import numpy as np
import pytest

from services.core.config import TrainConfig, render_prompt
from services.core.data import load_pairs
from services.core.errors import ConfigError, DataError
from services.training.encoded import encode_pairs
from services.training.tasks import IGNORE_INDEX, GenerationTask, lm_batch, token_nll
from tests.helpers import GEN_TEMPLATE, write_jsonl


@pytest.fixture(scope="module")
def tokenizer(tiny_gpt2_dir):
    from services.core.modeling import load_tokenizer

    return load_tokenizer(str(tiny_gpt2_dir))


def test_load_pairs_picks_columns_and_names_bad_rows(tmp_path):
    path = write_jsonl(tmp_path / "gsm.jsonl", [{"question": "1+1?", "answer": "2"},
                                                {"question": "2+2?", "answer": "4"}])
    data = load_pairs(path)
    assert (data.prompts, data.responses) == (["1+1?", "2+2?"], ["2", "4"])
    assert (data.prompt_column, data.response_column) == ("question", "answer")
    (tmp_path / "p.csv").write_text("q,a\nhello,world\n")
    data = load_pairs(tmp_path / "p.csv", prompt_column="q", response_column="a")
    assert data.responses == ["world"]
    with pytest.raises(DataError, match="pass --prompt-column"):
        load_pairs(tmp_path / "p.csv")
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "response": "b"},
                                               {"prompt": "c", "response": "  "}])
    with pytest.raises(DataError, match=r"bad.jsonl:2: empty response in column 'response'"):
        load_pairs(bad)
    bad = write_jsonl(tmp_path / "bad2.jsonl", [{"prompt": 3, "response": "b"}])
    with pytest.raises(DataError, match="prompt in column 'prompt' is not a string"):
        load_pairs(bad)


def test_prompt_template_config_checks():
    ok = TrainConfig(model="m", train="t.jsonl", task="generation",
                     prompt_template="Q: {prompt}\nA:").validate()
    assert render_prompt(ok.prompt_template, "hi {x}") == "Q: hi {x}\nA:"
    assert render_prompt(None, "hi") == "hi"
    for template, needle in [("no placeholder", "exactly once"),
                             ("{prompt} {prompt}", "exactly once"),
                             ("{prompt} {other}", "no other"),
                             ("{prompt", "no other"),
                             ("{prompt[0]}", "without an index"),
                             ("Q: {prompt:>10}", "(got {prompt:>10})"),
                             ("{prompt!r}", "(got {prompt!r})")]:
        with pytest.raises(ConfigError, match="prompt_template") as err:
            TrainConfig(model="m", train="t.jsonl", task="generation",
                        prompt_template=template).validate()
        assert needle in str(err.value)
    with pytest.raises(ConfigError, match="'prompt_template': applies to --task generation"):
        TrainConfig(model="m", train="t.csv", prompt_template="{prompt}").validate()
    with pytest.raises(ConfigError, match="'lora_r'"):
        TrainConfig(model="m", train="t.csv", lora_r=8).validate()
    with pytest.raises(ConfigError, match="'lora_dropout'"):
        TrainConfig(model="m", train="t.jsonl", task="generation", lora_r=8,
                    lora_dropout=1.0).validate()
    cfg = TrainConfig(model="m", train="t.jsonl", task="generation", lora_r=4,
                      lora_target_modules="c_attn, c_proj").validate()
    assert cfg.lora_target_modules == ["c_attn", "c_proj"]


def test_loss_mask_covers_response_and_eos_only(tokenizer):
    split, stats = encode_pairs(tokenizer, ["red cat"], [" the red cat says meow."],
                                GEN_TEMPLATE, max_length=64)
    prompt_ids = tokenizer(GEN_TEMPLATE.format(prompt="red cat"))["input_ids"]
    response_ids = tokenizer(" the red cat says meow.", add_special_tokens=False)["input_ids"]
    assert split.example(0).tolist() == prompt_ids + response_ids + [tokenizer.eos_token_id]
    assert split.mask(0).tolist() == [False] * len(prompt_ids) + [True] * (len(response_ids) + 1)
    assert stats == {"examples": 1, "sequences": 1, "truncated": 0,
                     "target_tokens": len(response_ids) + 1}


def test_truncation_never_drops_the_whole_response(tokenizer):
    long_prompt = "cat " * 100
    split, stats = encode_pairs(tokenizer, [long_prompt, "red cat"],
                                [" a short answer", " dog" * 100], None, max_length=32)
    assert stats["truncated"] == 2
    assert all(len(split.example(i)) == 32 for i in range(2))
    # 1: the prompt loses its start; the whole response and its EOS stay
    response = tokenizer(" a short answer", add_special_tokens=False)["input_ids"]
    assert split.example(0)[-len(response) - 1:].tolist() == response + [tokenizer.eos_token_id]
    assert int(split.mask(0).sum()) == len(response) + 1
    # 2: a long response keeps half of max_length, cut at its end and without an EOS
    assert int(split.mask(1).sum()) == 32 - len(tokenizer("red cat")["input_ids"])
    assert split.example(1)[-1] != tokenizer.eos_token_id


def test_packing_joins_examples_up_to_max_length(tokenizer):
    prompts, responses = ["red cat"] * 6, [" the red cat says meow."] * 6
    plain, _ = encode_pairs(tokenizer, prompts, responses, GEN_TEMPLATE, max_length=40)
    packed, stats = encode_pairs(tokenizer, prompts, responses, GEN_TEMPLATE, max_length=40,
                                 packing=True)
    per = len(plain.example(0))
    assert stats["sequences"] == len(packed) == -(-6 // (40 // per))
    assert packed.ids.tolist() == plain.ids.tolist()  # same tokens, fewer rows
    assert packed.loss_mask.tolist() == plain.loss_mask.tolist()


def test_lm_batch_and_loss_ignore_prompt_and_padding():
    import torch

    items = [(np.array([5, 6, 7, 8]), np.array([False, False, True, True])),
             (np.array([9, 10]), np.array([False, True]))]
    batch = lm_batch(items, pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8], [9, 10, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX] * 2 + [7, 8],
                                        [IGNORE_INDEX, 10] + [IGNORE_INDEX] * 2]
    logits = torch.zeros((2, 4, 16))
    nll, n = token_nll(logits, batch["labels"])
    assert n == 3 and float(nll) == pytest.approx(3 * np.log(16))


@pytest.mark.filterwarnings("ignore::FutureWarning")  # peft on transformers 5
def test_lora_is_merged_into_the_saved_checkpoint(tiny_gpt2_dir, tokenizer, tmp_path):
    pytest.importorskip("peft")
    import torch
    from transformers import AutoModelForCausalLM

    cfg = TrainConfig(model=str(tiny_gpt2_dir), train="t.jsonl", task="generation", lora_r=4,
                      lora_alpha=8.0, lora_dropout=0.0).validate()
    task = GenerationTask(cfg)
    task.pad_id = tokenizer.pad_token_id
    model = task.build_model(tokenizer)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    with torch.no_grad():  # a non-zero adapter, as after training
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    model.eval()
    ids = torch.tensor([tokenizer("red cat")["input_ids"]])
    expected = model(input_ids=ids).logits
    task.save(model, str(tmp_path), tokenizer)
    saved = AutoModelForCausalLM.from_pretrained(str(tmp_path), use_safetensors=True).eval()
    assert not any("lora" in n for n, _ in saved.named_parameters())
    # the tokenizer's EOS is the config's: one id, as before
    assert saved.generation_config.eos_token_id == tokenizer.eos_token_id
    torch.testing.assert_close(saved(input_ids=ids).logits, expected, atol=1e-4, rtol=1e-4)
    assert json.loads((tmp_path / "tuneserve.json").read_text())["lora"]["r"] == 4


def test_cli_train_generation_flags(monkeypatch, tmp_path, capsys):
    """`tuneserve train --task generation ...`: flags reach TrainConfig; \\n in the
    template flag is a newline; a bad template exits 2 naming the field."""
    from services.cli import main
    from services.training import run

    seen = {}

    def fake_run_training(cfg, **kw):
        seen["cfg"] = cfg.validate()
        raise DataError("stop here")

    monkeypatch.setattr(run, "run_training", fake_run_training)
    code = main(["train", "--task", "generation", "--model", "m", "--train", "g.jsonl",
                 "--prompt-column", "question", "--response-column", "answer",
                 "--prompt-template", "Question: {prompt}\\nAnswer: ", "--packing",
                 "--lora-r", "8", "--lora-target-modules", "q_proj,v_proj"])
    assert code == 2 and "stop here" in capsys.readouterr().err
    cfg = seen["cfg"]
    assert cfg.prompt_template == "Question: {prompt}\nAnswer: "
    assert (cfg.prompt_column, cfg.response_column, cfg.packing) == ("question", "answer", True)
    assert cfg.lora_r == 8 and cfg.lora_target_modules == ["q_proj", "v_proj"]
    code = main(["train", "--task", "generation", "--model", "m", "--train", "g.jsonl",
                 "--prompt-template", "no placeholder"])
    assert code == 2 and "'prompt_template'" in capsys.readouterr().err


def test_cli_generate_against_nothing_reports_unavailable(capsys):
    from services.cli import main
    from tests.helpers import free_port

    code = main(["generate", "--address", f"127.0.0.1:{free_port()}", "--model", "m",
                 "--timeout-s", "2", "--stream", "hello"])
    assert code == 1
    err = capsys.readouterr().err
    assert "UNAVAILABLE" in err or "DEADLINE_EXCEEDED" in err


class _Terminal:
    """A stderr that says it is a terminal and keeps what is written to it."""

    def __init__(self):
        self.parts: list[str] = []

    def isatty(self):
        return True

    def write(self, text):
        self.parts.append(text)

    def flush(self):
        pass


def test_tokenising_many_examples_shows_progress_on_a_terminal(tokenizer, monkeypatch):
    from services.training import encoded

    prompts, responses = ["2+2"] * 10, ["4"] * 10
    monkeypatch.setattr(encoded, "PROGRESS_MIN_EXAMPLES", 10)
    # not a terminal: nothing
    monkeypatch.setattr("sys.stderr", terminal := _Terminal())
    terminal.isatty = lambda: False
    split, _ = encode_pairs(tokenizer, prompts, responses, None, 32, chunk=4, desc="train")
    assert terminal.parts == [] and len(split.offsets) == 11
    # a terminal: a bar over every example
    monkeypatch.setattr("sys.stderr", terminal := _Terminal())
    split, _ = encode_pairs(tokenizer, prompts, responses, None, 32, chunk=4, desc="train")
    shown = "".join(terminal.parts)
    assert "tokenising train" in shown and "/10 " in shown
    texts = encoded.encode_texts(tokenizer, ["a b"] * 10, [0] * 10, 16, chunk=4, desc="eval")
    assert "tokenising eval" in "".join(terminal.parts) and len(texts.labels) == 10
    # below the threshold: no bar
    monkeypatch.setattr("sys.stderr", terminal := _Terminal())
    encoded.encode_texts(tokenizer, ["a b"] * 9, [0] * 9, 16, chunk=4)
    assert terminal.parts == []


def test_length_statistics_are_the_datas_not_capped_at_the_limit():
    from tests.helpers import build_bpe_tokenizer

    prompts = ["what is " + "very " * 40 + "long", "short"]
    responses = ["an answer " * 20, "ok"]
    tokenizer = build_bpe_tokenizer(prompts + responses)
    task = GenerationTask(TrainConfig(model="m", train="t.jsonl", task="generation").resolve())
    lengths = task.example_lengths(tokenizer, (prompts, responses), limit=16)
    assert lengths[0] > 16 and lengths[1] < 16


def test_alpaca_records_join_the_input_to_the_instruction(tmp_path):
    path = write_jsonl(tmp_path / "alpaca.jsonl", [
        {"instruction": "Translate to French", "input": "cat", "output": "chat"},
        {"instruction": "Name a colour", "input": "", "output": "red"}])
    pairs = load_pairs(path)
    assert pairs.prompts == ["Translate to French\n\ncat", "Name a colour"]
    assert pairs.responses == ["chat", "red"]
    assert pairs.prompt_column == "instruction+input"
    # named columns are taken as named
    assert load_pairs(path, prompt_column="instruction").prompts[0] == "Translate to French"
