"""SFT data: formats → conversations → ids + loss mask, checked token by token on the real instruction data."""

import json

import pytest
import torch
import torch.nn.functional as F

from gptforge.chat_template import render_chat
from gptforge.data.chat import (
    ALPACA_TEMPLATE,
    encode_conversation,
    encode_dataset,
    encode_prompt,
    load_records,
    pack_batch,
    pack_examples,
    pad_batch,
    prompt_messages,
    prompt_style,
    split_indices,
    to_conversations,
)
from gptforge.errors import GptforgeError
from gptforge.model import GPT, IGNORE_INDEX, GPTConfig
from gptforge.tokenizer import EOT, IM_END, IM_START, load_tokenizer


@pytest.fixture(scope="module")
def gpt2():
    tok = load_tokenizer("gpt2")
    tok.add_special_tokens([IM_START, IM_END])
    return tok


@pytest.fixture(scope="module")
def alpaca_convs(data_dir):
    convs, skipped = to_conversations(load_records(data_dir / "instruct" / "instruction-data.json"))
    assert skipped == 0
    return convs


@pytest.fixture(scope="module")
def sharegpt_convs(data_dir):
    convs, _ = to_conversations(load_records(data_dir / "instruct" / "sharegpt-dummy.json"))
    return convs


# ---- formats ---------------------------------------------------------------------------------------------


def test_alpaca_records_become_user_and_assistant_turns(alpaca_convs, data_dir):
    raw = json.loads((data_dir / "instruct" / "instruction-data.json").read_text())
    assert len(alpaca_convs) == len(raw) == 1100
    first = alpaca_convs[0]
    assert first.messages == [
        {"role": "user", "content": raw[0]["instruction"], "input": raw[0]["input"]},
        {"role": "assistant", "content": raw[0]["output"]},
    ]
    assert (first.instruction, first.input, first.reference) == (raw[0]["instruction"], raw[0]["input"], raw[0]["output"])
    no_input = next(c for c, r in zip(alpaca_convs, raw) if not r["input"])
    assert "input" not in no_input.messages[0]


def test_sharegpt_multi_turn_roles_are_mapped(sharegpt_convs, data_dir):
    raw = json.loads((data_dir / "instruct" / "sharegpt-dummy.json").read_text())
    assert len(sharegpt_convs) == 500
    six = next(i for i, r in enumerate(raw) if len(r["conversations"]) == 6)
    conv = sharegpt_convs[six]
    assert [m["role"] for m in conv.messages] == ["user", "assistant"] * 3
    assert conv.reference == raw[six]["conversations"][-1]["value"].strip()
    assert conv.instruction == raw[six]["conversations"][-2]["value"].strip()


def test_dolly_and_messages_formats_are_detected():
    dolly = [{"instruction": "Name a colour.", "context": "Think of the sky.", "response": "Blue.", "category": "qa"}]
    convs, _ = to_conversations(dolly)
    assert convs[0].messages[0] == {"role": "user", "content": "Name a colour.", "input": "Think of the sky."}
    assert convs[0].reference == "Blue."
    messages = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                              {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"},
                              {"role": "assistant", "content": "Bye!"}]}]
    convs, _ = to_conversations(messages)
    assert [m["role"] for m in convs[0].messages] == ["system", "user", "assistant", "user", "assistant"]
    assert (convs[0].instruction, convs[0].reference) == ("Bye", "Bye!")


def test_turn_keys_of_either_layout_and_the_sharegpt_system_column():
    """LLaMA-Factory's ShareGPT records may carry a top-level ``system``; some datasets use role/content turns under
    ``conversations`` (or from/value under ``messages``). Plain records get no tools."""
    record = {"conversations": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}],
              "system": "Be kind."}
    conv = to_conversations([record])[0][0]
    assert conv.messages == [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"},
                             {"role": "assistant", "content": "Hello."}]
    assert conv.tools == []
    conv = to_conversations([{"messages": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo."}]}])[0][0]
    assert conv.messages == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo."}]


def test_tool_turns_need_a_call_and_the_chat_style(gpt2):
    calls = [{"id": "c", "type": "function", "function": {"name": "f", "arguments": {}}}]
    with pytest.raises(GptforgeError, match="record 0: a tool result"):
        to_conversations([{"messages": [{"role": "user", "content": "x"}, {"role": "tool", "content": "1"},
                                        {"role": "assistant", "content": "y"}]}])
    with pytest.raises(GptforgeError, match="record 0: an assistant turn is empty"):
        to_conversations([{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": None}]}])
    conv = to_conversations([{"messages": [{"role": "user", "content": "x"},
                                           {"role": "assistant", "content": None, "tool_calls": calls},
                                           {"role": "tool", "content": {"ok": True}}]}])[0][0]
    assert conv.messages[1]["tool_calls"][0]["function"]["arguments"] == "{}"
    assert conv.messages[2]["content"] == '{"ok": true}'  # a structured result becomes its JSON
    assert conv.reference == '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>'
    ex = encode_conversation(conv.messages, gpt2, prompt_style("chat"))
    assert gpt2.decode([t for t in ex.labels if t != IGNORE_INDEX]) == conv.reference + IM_END
    with pytest.raises(GptforgeError, match="cannot render tools"):
        encode_conversation(conv.messages, gpt2, prompt_style("alpaca"))


def test_jsonl_and_parquet_files_load(tmp_path, data_dir):
    raw = json.loads((data_dir / "instruct" / "instruction-data.json").read_text())[:5]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in raw) + "\n")
    assert load_records(jsonl) == raw
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(raw), tmp_path / "d.parquet")
    assert load_records(tmp_path / "d.parquet") == raw


def test_malformed_record_names_its_index_or_is_skipped(data_dir):
    raw = json.loads((data_dir / "instruct" / "instruction-data.json").read_text())[:10]
    raw[3] = {"instruction": "Say hi", "input": ""}  # no output
    raw[7]["output"] = ""
    with pytest.raises(GptforgeError, match=r"record 3: missing field 'output'.*--skip-bad"):
        to_conversations(raw)
    convs, skipped = to_conversations(raw, skip_bad=True)
    assert skipped == 2 and len(convs) == 8
    assert [c.index for c in convs] == [0, 1, 2, 4, 5, 6, 8, 9]


def test_bad_turns_and_unknown_formats_are_rejected():
    with pytest.raises(GptforgeError, match="record 0, turn 1: unknown role 'robot'"):
        to_conversations([{"conversations": [{"from": "human", "value": "x"}, {"from": "robot", "value": "y"}]}])
    with pytest.raises(GptforgeError, match="record 0: no assistant turn"):
        to_conversations([{"messages": [{"role": "user", "content": "x"}]}])
    with pytest.raises(GptforgeError, match="cannot tell the format"):
        to_conversations([{"prompt": "x", "completion": "y"}])


def test_invalid_jsonl_line_is_reported_with_line_number(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"instruction": "a", "output": "b"}\n{"instruction": \n')
    with pytest.raises(GptforgeError, match=r"bad.jsonl:2"):
        load_records(p)


# ---- rendering and masks, token by token -------------------------------------------------------------------


def _expected_chat_labels(ids, tok, only_last=False):
    """Independent oracle: tokens after '<|im_start|>assistant\\n' up to and including the next <|im_end|>."""
    start, end = tok.special_tokens[IM_START], tok.special_tokens[IM_END]
    header = [start] + tok.encode("assistant\n")
    labels = [IGNORE_INDEX] * len(ids)
    spans = []
    i = 0
    while i < len(ids):
        if ids[i:i + len(header)] == header:
            j = i + len(header)
            k = ids.index(end, j)
            spans.append((j, k + 1))
            i = k + 1
        else:
            i += 1
    for a, b in (spans[-1:] if only_last else spans):
        labels[a:b] = ids[a:b]
    return labels, spans


def test_chat_mask_matches_oracle_on_every_sharegpt_conversation(gpt2, sharegpt_convs):
    style = prompt_style("chat")
    for conv in sharegpt_convs:
        ex = encode_conversation(conv.messages, gpt2, style)
        # the ids are exactly the tokenization of the rendered text (what chat/serve/export see)
        assert ex.ids == gpt2.encode(render_chat(conv.messages), allow_special=True)
        expected, spans = _expected_chat_labels(ex.ids, gpt2)
        assert ex.labels == expected, conv.index
        n_assistant = sum(m["role"] == "assistant" for m in conv.messages)
        assert len(spans) == n_assistant
        # each supervised span decodes to the answer followed by the end-of-turn token
        answers = [m["content"] for m in conv.messages if m["role"] == "assistant"]
        assert [gpt2.decode(ex.ids[a:b]) for a, b in spans] == [a + IM_END for a in answers]


def test_train_on_last_supervises_only_the_final_answer(gpt2, sharegpt_convs):
    style = prompt_style("chat")
    conv = next(c for c in sharegpt_convs if len(c.messages) == 6)
    ex = encode_conversation(conv.messages, gpt2, style, train_on="last")
    expected, _ = _expected_chat_labels(ex.ids, gpt2, only_last=True)
    assert ex.labels == expected
    assert gpt2.decode([t for t in ex.labels if t != IGNORE_INDEX]) == conv.messages[-1]["content"] + IM_END


def test_alpaca_style_masks_the_prompt_and_supervises_answer_plus_eot(gpt2, alpaca_convs):
    style = prompt_style("alpaca")
    eot = gpt2.special_tokens[EOT]
    for conv in alpaca_convs:
        ex = encode_conversation(conv.messages, gpt2, style)
        assert ex.ids == gpt2.encode(render_chat(conv.messages, ALPACA_TEMPLATE), allow_special=True)
        prompt = encode_prompt(prompt_messages(conv), gpt2, style)
        assert ex.ids[: len(prompt)] == prompt
        assert gpt2.decode(prompt).endswith("\n\n### Response:\n")
        assert ex.labels[: len(prompt)] == [IGNORE_INDEX] * len(prompt)  # the whole prompt is masked
        assert ex.labels[len(prompt):] == ex.ids[len(prompt):]  # the whole answer is supervised
        assert ex.ids[-1] == eot
        assert gpt2.decode(ex.ids[len(prompt):]) == conv.reference + EOT
    text = gpt2.decode(encode_conversation(alpaca_convs[0].messages, gpt2, style).ids)
    assert "### Instruction:\n" + alpaca_convs[0].instruction + "\n\n### Input:\n" + alpaca_convs[0].input in text


def test_chat_prompt_is_the_training_prefix_up_to_the_answer(gpt2, alpaca_convs):
    style = prompt_style("chat")
    conv = alpaca_convs[0]
    ex = encode_conversation(conv.messages, gpt2, style)
    prompt = encode_prompt(prompt_messages(conv), gpt2, style)
    assert ex.ids[: len(prompt)] == prompt
    first_supervised = next(i for i, t in enumerate(ex.labels) if t != IGNORE_INDEX)
    assert first_supervised == len(prompt)
    assert gpt2.decode(prompt).endswith("<|im_start|>assistant\n")
    # chat style folds the alpaca input into the user turn
    assert f"<|im_start|>user\n{conv.instruction}\n\n{conv.input}<|im_end|>" in gpt2.decode(prompt)


def test_system_and_multi_turn_messages_mask_everything_but_the_answers(gpt2):
    record = {"messages": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2+2?"},
                           {"role": "assistant", "content": "4"}, {"role": "user", "content": "3+3?"},
                           {"role": "assistant", "content": "6"}]}
    conv = to_conversations([record])[0][0]
    chat = encode_conversation(conv.messages, gpt2, prompt_style("chat"))
    expected, spans = _expected_chat_labels(chat.ids, gpt2)
    assert chat.labels == expected and len(spans) == 2
    assert gpt2.decode(chat.ids).startswith("<|im_start|>system\nYou are terse.<|im_end|>\n")
    alpaca = encode_conversation(conv.messages, gpt2, prompt_style("alpaca"))
    text = gpt2.decode(alpaca.ids)
    assert text.startswith("You are terse.\n\n### Instruction:\n2+2?")  # the system prompt replaces the preamble
    assert gpt2.decode([t for t in alpaca.labels if t != IGNORE_INDEX]) == "4" + EOT + "6" + EOT
    last = encode_conversation(conv.messages, gpt2, prompt_style("alpaca"), train_on="last")
    assert gpt2.decode([t for t in last.labels if t != IGNORE_INDEX]) == "6" + EOT


def test_special_token_text_inside_content_is_not_a_control_token(gpt2):
    style = prompt_style("chat")
    messages = [{"role": "user", "content": "print <|im_end|> please"}, {"role": "assistant", "content": "ok"}]
    ex = encode_conversation(messages, gpt2, style)
    assert ex.ids.count(gpt2.special_tokens[IM_END]) == 2  # end of the user turn and of the answer only
    assert gpt2.decode(ex.ids).count("<|im_end|>") == 3


def test_chat_style_needs_the_chat_tokens(data_dir, alpaca_convs):
    plain = load_tokenizer("gpt2")
    with pytest.raises(GptforgeError, match="lacks the special tokens"):
        encode_dataset(alpaca_convs[:3], plain, prompt_style("chat"), max_len=512, progress=False)


def test_overlength_examples_are_dropped_or_truncated_and_zero_supervision_fails(gpt2, alpaca_convs):
    style = prompt_style("alpaca")
    convs = alpaca_convs[:50]
    lengths = [len(encode_conversation(c.messages, gpt2, style).ids) for c in convs]
    limit = sorted(lengths)[25]
    kept, stats = encode_dataset(convs, gpt2, style, max_len=limit - 1, progress=False)
    assert stats.dropped_too_long == sum(n > limit for n in lengths) and len(kept) == 50 - stats.dropped_too_long
    kept, stats = encode_dataset(convs, gpt2, style, max_len=limit - 1, overlength="truncate", progress=False)
    assert all(len(e) <= limit for e in kept) and stats.truncated > 0
    with pytest.raises(GptforgeError, match="no supervised"):
        encode_dataset(convs, gpt2, style, max_len=8, progress=False)  # every prompt is longer: nothing to learn


# ---- splitting and batching --------------------------------------------------------------------------------


def test_split_is_deterministic_and_disjoint():
    a = split_indices(1100, [0.85, 0.05, 0.10], seed=0)
    assert a == split_indices(1100, [0.85, 0.05, 0.10], seed=0)
    assert [len(x) for x in a] == [935, 55, 110]
    assert sorted(i for part in a for i in part) == list(range(1100))
    assert a != split_indices(1100, [0.85, 0.05, 0.10], seed=1)
    with pytest.raises(GptforgeError):
        split_indices(10, [0.5, 0.6, 0.1])


def _per_example_loss(model, batch):
    logits, _ = model(batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids)
    ce = F.cross_entropy(logits.flatten(0, 1), batch.targets.flatten(), ignore_index=IGNORE_INDEX, reduction="none")
    ce = ce.view_as(batch.targets)
    n = int(batch.example_ids.max()) + 1
    return torch.stack([ce[batch.example_ids == i].sum() for i in range(n)])


def test_packed_and_padded_batches_give_the_same_per_example_loss(gpt2, alpaca_convs):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=gpt2.vocab_size, block_size=256, n_layer=2, n_head=2, n_embd=32)).eval()
    examples = [encode_conversation(c.messages, gpt2, prompt_style("alpaca")) for c in alpaca_convs[:12]]
    bins = pack_examples(examples, window=256)
    assert len(bins) < len(examples)  # several examples share a window
    rows = [[examples[i] for i in b] for b in bins]
    packed = pack_batch(rows, gpt2.eot_id, window=256)
    order = [i for b in bins for i in b]  # packed example ids follow the bins
    padded = pad_batch([examples[i] for i in order], gpt2.eot_id)
    with torch.no_grad():
        lp, lu = _per_example_loss(model, packed), _per_example_loss(model, padded)
    assert packed.num_supervised == padded.num_supervised == sum(
        sum(t != IGNORE_INDEX for t in e.labels[1:]) for e in examples)
    torch.testing.assert_close(lp, lu, rtol=1e-4, atol=1e-4)
    # positions restart at every example boundary
    starts = (packed.position_ids == 0) & (packed.example_ids >= 0)
    assert int(starts.sum()) == len(examples)
