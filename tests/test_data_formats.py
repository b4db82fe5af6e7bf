"""Which tokens carry the loss, per data format, on the real path of `pissa train` (records converted by
pissa.data.sft, tokenized and labelled by TRL's SFTTrainer), decoded and compared with hand-written text.

SmolLM2's tokenizer and ChatML template (the default system turn included) on a tiny model of its vocabulary;
a copy without the template for the untemplated path. Also: the masks on the bundled `arith` set against
the pre-TRL recipe's, evaluation's tokens == training's, the marked template renders as the original, and
over-long records are dropped, not truncated.
"""

from __future__ import annotations

import copy
import json

import pytest

from helpers import build_tiny_llama
from pissa.data.formats import load_examples
from pissa.data.sft import build_sft_data
from pissa.data.template import with_generation_markers
from pissa.data.tokens import IGNORE_INDEX, encode, render_prompt
from pissa.errors import PissaError
from pissa.train import TrainConfig, TrainRecipe

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.long]

SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
ALPACA = ("Below is an instruction that describes a task, paired with an input that provides further context. "
          "Write a response that appropriately completes the request.\n\n### Instruction:\nAdd the numbers.\n\n"
          "### Input:\n2 and 3\n\n### Response:\n")


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


# format -> (record, [decoded runs of loss tokens], the whole decoded sequence) with the ChatML template
CASES = {
    "alpaca": ({"instruction": "Add the numbers.", "input": "2 and 3", "output": "2 + 3 = 5. The answer is: 5"},
               ["2 + 3 = 5. The answer is: 5<|im_end|>\n"],
               SYSTEM + "<|im_start|>user\nAdd the numbers.\n\n2 and 3<|im_end|>\n<|im_start|>assistant\n"
               "2 + 3 = 5. The answer is: 5<|im_end|>\n"),
    "metamath": ({"query": "What is 7 * 6?", "response": "7 * 6 = 42.\nThe answer is: 42"},
                 ["7 * 6 = 42.\nThe answer is: 42<|im_end|>\n"],
                 SYSTEM + "<|im_start|>user\nWhat is 7 * 6?<|im_end|>\n<|im_start|>assistant\n"
                 "7 * 6 = 42.\nThe answer is: 42<|im_end|>\n"),
    "gsm8k": ({"question": "What is 7 * 6?", "answer": "7 * 6 = <<7*6=42>>42\n#### 42"},
              ["7 * 6 = <<7*6=42>>42\n#### 42<|im_end|>\n"], None),
    "math": ({"problem": "What is 7 times 6?", "solution": "It is $\\boxed{42}$."},
             ["It is $\\boxed{42}$.<|im_end|>\n"], None),
    "chat": ({"messages": [{"role": "system", "content": "Be brief."}, user("Capital of France?"),
                           assistant("Paris.")]},
             ["Paris.<|im_end|>\n"],
             "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nCapital of France?<|im_end|>\n"
             "<|im_start|>assistant\nParis.<|im_end|>\n"),
    "chat-multi-turn": ({"messages": [user("2+2?"), assistant("4"), user("3+3?"), assistant("6")]},
                        ["4<|im_end|>\n", "6<|im_end|>\n"],  # every assistant turn, not only the last
                        SYSTEM + "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n"
                        "<|im_start|>user\n3+3?<|im_end|>\n<|im_start|>assistant\n6<|im_end|>\n"),
    "sharegpt-multi-turn": ({"conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"},
                                               {"from": "human", "value": "3+3?"}, {"from": "gpt", "value": "6"}]},
                            ["4<|im_end|>\n", "6<|im_end|>\n"], None),
    "content-parts-and-null": ({"messages": [{"role": "system", "content": None},
                                             user([{"type": "text", "text": "2+2?"}]),
                                             assistant([{"type": "text", "text": "4"}])]},
                               ["4<|im_end|>\n"],
                               "<|im_start|>system\n<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
                               "<|im_start|>assistant\n4<|im_end|>\n"),
    "prompt-completion": ({"prompt": "The capital of France is", "completion": " Paris."},
                          [" Paris.<|im_end|>"],  # raw text, no template; EOS appended
                          "The capital of France is Paris.<|im_end|>"),
    "prompt-completion-conversational": ({"prompt": [user("2+2?")], "completion": [assistant("4")]},
                                         ["4<|im_end|>\n"], None),
    "prompt-completion-conversational-history": (
        {"prompt": [user("2+2?"), assistant("4"), user("3+3?")], "completion": [assistant("6")]},
        ["6<|im_end|>\n"], None),  # assistant turns inside a prompt are context (TRL's format)
    "text": ({"text": "Paris is the capital of France."},
             ["Paris is the capital of France.<|im_end|>"],  # every token
             "Paris is the capital of France.<|im_end|>"),
}


@pytest.fixture(scope="module")
def smol_tokenizer(smollm2_tokenizer):
    return copy.deepcopy(smollm2_tokenizer)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, smol_tokenizer):
    """A tiny Llama of SmolLM2's vocabulary with its tokenizer ("chat"), and with the template removed ("plain")."""
    root = tmp_path_factory.mktemp("smol")
    model = build_tiny_llama(vocab_size=len(smol_tokenizer))
    plain = copy.deepcopy(smol_tokenizer)
    plain.chat_template = None
    for name, tok in (("chat", smol_tokenizer), ("plain", plain)):
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return root


def prepared(tmp_path, model_dir, records, **kw):
    """The recipe set up on `records` (nothing trained); its TRL-prepared training rows."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    config = TrainConfig(out=str(tmp_path / "run"), model=str(model_dir), data=str(path), rank=4, max_steps=1,
                         tensorboard=False, **kw)
    return TrainRecipe(config).setup()


def loss_runs(tokenizer, row) -> list[str]:
    """The decoded runs of consecutive tokens whose label is not -100."""
    runs, run = [], []
    for token, label in zip(row["input_ids"], row["labels"], strict=True):
        if label != IGNORE_INDEX:
            assert label == token  # labels are the input ids (the model shifts them)
            run.append(token)
        elif run:
            runs.append(run)
            run = []
    return [tokenizer.decode(r) for r in runs + ([run] if run else [])]


@pytest.mark.parametrize("case", list(CASES))
def test_loss_is_on_exactly_the_answers(tmp_path, model_dirs, smol_tokenizer, case):
    record, runs, whole = CASES[case]
    row = prepared(tmp_path, model_dirs / "chat", [record]).trainer.train_dataset[0]
    assert loss_runs(smol_tokenizer, row) == runs
    if whole is not None:
        assert smol_tokenizer.decode(row["input_ids"]) == whole


def test_alpaca_prompt_without_a_chat_template(tmp_path, model_dirs, smol_tokenizer):
    record = CASES["alpaca"][0]
    row = prepared(tmp_path, model_dirs / "plain", [record]).trainer.train_dataset[0]
    assert smol_tokenizer.decode(row["input_ids"]) == ALPACA + "2 + 3 = 5. The answer is: 5<|im_end|>"
    assert loss_runs(smol_tokenizer, row) == ["2 + 3 = 5. The answer is: 5<|im_end|>"]


def test_several_assistant_turns_without_a_template_refused(tmp_path, model_dirs):
    with pytest.raises(PissaError, match="line 1: a conversation with several assistant turns needs a chat template"):
        prepared(tmp_path, model_dirs / "plain", [CASES["chat-multi-turn"][0]])
    assert not (tmp_path / "run").exists()


def test_evaluation_tokens_equal_training_tokens(tmp_path, model_dirs, smol_tokenizer):
    """pissa.data.tokens.encode (eval's prompts and perplexity) gives TRL's training rows, token for token."""
    single = [c for c in CASES if "multi" not in c and c != "text"]
    for name in ("chat", "plain"):
        for case in single:
            if name == "plain" and case.startswith("prompt-completion-conversational"):
                continue  # a conversational record needs a template
            record = CASES[case][0]
            row = prepared(tmp_path / name / case, model_dirs / name, [record]).trainer.train_dataset[0]
            tok = copy.deepcopy(smol_tokenizer)
            tok.chat_template = tok.chat_template if name == "chat" else None
            path = tmp_path / name / case / "data.jsonl"
            (example,), _, _ = load_examples(path)
            assert encode(tok, example, 10**6) == {"input_ids": row["input_ids"], "labels": row["labels"]}, case


def test_arith_masks_are_the_old_ones_plus_the_templates_newline(smol_tokenizer):
    """Before TRL, pissa trained prompt | response + EOS. TRL trains the assistant turn as the template writes
    it, which for ChatML is response + <|im_end|> + "\\n": the same tokens and labels with one more trained
    token, the newline that ends the turn. Without a template nothing changes."""
    tok = smol_tokenizer
    examples, _, _ = load_examples("arith:train", limit=50)
    data = build_sft_data("arith:train", tok, max_length=512, limit=50)
    newline = tok("\n", add_special_tokens=False)["input_ids"]
    assert newline == [198]
    for example, record in zip(examples, data.records, strict=True):
        prompt = tok(tok.apply_chat_template(example.prompt, tokenize=False, add_generation_prompt=True),
                     add_special_tokens=False)["input_ids"]
        response = tok(example.response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        old = {"input_ids": prompt + response, "labels": [IGNORE_INDEX] * len(prompt) + response}
        assert record == {"prompt": example.prompt, "completion": example.completion}
        new = encode(tok, example, 10**6)
        assert new == {"input_ids": old["input_ids"] + newline, "labels": old["labels"] + newline}
    plain = copy.deepcopy(tok)
    plain.chat_template = None
    for example in examples:  # the Alpaca prompt: exactly the old tokens and labels
        prompt = plain(render_prompt(plain, example))["input_ids"]
        response = plain(example.response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert encode(plain, example, 10**6) == {"input_ids": prompt + response,
                                                 "labels": [IGNORE_INDEX] * len(prompt) + response}


def test_marked_template_renders_as_the_original(smol_tokenizer):
    """The copy with generation markers writes the same text for every conversation shape; a template that
    already has markers is used as it is."""
    tok = smol_tokenizer
    original = tok.chat_template
    marked = with_generation_markers(original)
    assert "{% generation %}" not in original and "generation" in marked
    chats = [[user("a"), assistant("b")], [{"role": "system", "content": "s"}, user("a"), assistant("b")],
             [user("a"), assistant("b"), user("c"), assistant("d"), user("e"), assistant("f")],
             [user("a"), assistant(""), user("c"), assistant("d")]]
    for turns in chats:
        for prompt in (False, True):
            turns_ = turns[:-1] if prompt else turns
            assert tok.apply_chat_template(turns_, tokenize=False, chat_template=marked, add_generation_prompt=prompt) \
                == tok.apply_chat_template(turns_, tokenize=False, add_generation_prompt=prompt)
    assert with_generation_markers(marked) == marked


def test_template_that_rewrites_earlier_turns_is_refused(tmp_path, model_dirs, smol_tokenizer):
    """A template that renders an earlier assistant turn differently once later turns follow (here: it drops
    everything before '</think>') cannot be marked turn by turn; the record is named."""
    tok = copy.deepcopy(smol_tokenizer)
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% if m['role'] == 'assistant' and not loop.last %}{{ m['content'].split('</think>')[-1] }}"
        "{% else %}{{ m['content'] }}{% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    folder = tmp_path / "thinking"
    build_tiny_llama(vocab_size=len(tok)).save_pretrained(folder)
    tok.save_pretrained(folder)
    turns = [user("2+2?"), assistant("<think>2 and 2</think>4"), user("3+3?"), assistant("6")]
    with pytest.raises(PissaError, match=r"data\.jsonl line 2: .* not prefix-preserving"):
        prepared(tmp_path, folder, [{"messages": turns[:2]}, {"messages": turns}])


def test_over_long_records_are_dropped_not_truncated(tmp_path, model_dirs, smol_tokenizer):
    short, long = CASES["metamath"][0], {"query": "x " * 300, "response": "y"}
    recipe = prepared(tmp_path, model_dirs / "chat", [short, long, short], max_length=128)
    rows = recipe.trainer.train_dataset
    assert len(rows) == 2 and recipe.data.stats.too_long == 1 and recipe.data.stats.records == 3
    assert all(loss_runs(smol_tokenizer, row) == CASES["metamath"][1] for row in rows)  # whole, answer intact
    with pytest.raises(PissaError, match="every example .* longer than --max-length 8 tokens"):
        prepared(tmp_path / "b", model_dirs / "chat", [short], max_length=8)


def test_template_without_end_of_turn_token_warns(tmp_path, tiny_dir, data_file):
    """The tests' character-level template ends a turn with a plain newline: the model would not learn to stop."""
    with pytest.warns(UserWarning, match="does not learn to stop"):
        TrainRecipe(TrainConfig(out=str(tmp_path / "run"), model=str(tiny_dir), data=str(data_file), rank=4,
                                max_steps=1, tensorboard=False)).setup()
