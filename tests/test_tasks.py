"""Zero-shot multiple-choice scoring on the real task files in ../shared/data."""

import pytest
import torch
from transformers import AutoTokenizer

from conftest import SHARED_DATA, STORIES, tiny_model
from lte.errors import UsageError
from lte.tasks import TASKS, Example, accuracy, choice_logprobs, load_task, parse_tasks


def test_every_task_file_loads_with_valid_labels():
    tasks = parse_tasks(",".join(TASKS), str(SHARED_DATA))
    sizes = {}
    for name, path in tasks.items():
        examples = load_task(name, path)
        sizes[name] = len(examples)
        assert all(0 <= e.label < len(e.continuations) and e.context and all(c.startswith(" ") for c in e.continuations)
                   for e in examples), name
    assert sizes == {"piqa": 1838, "arc_easy": 570, "hellaswag": 1000, "boolq": 3270}
    assert load_task("boolq", tasks["boolq"], limit=5)[0].continuations == [" no", " yes"]
    assert "[" not in load_task("hellaswag", tasks["hellaswag"], limit=1)[0].context  # lm-eval's cleaning


def test_bad_task_arguments_are_usage_errors(tmp_path):
    with pytest.raises(UsageError, match="unknown task 'mmlu'"):
        parse_tasks("mmlu", str(SHARED_DATA))
    with pytest.raises(UsageError, match="--task-dir"):
        parse_tasks("piqa", None)
    bad = tmp_path / "arc.json"
    bad.write_text('[{"question": "q"}]')
    with pytest.raises(UsageError, match="not in the expected format"):
        load_task("arc_easy", bad)


def test_batched_scoring_matches_one_sequence_at_a_time():
    """Choices of different lengths share one right-padded batch; each score must equal scoring
    that context + continuation on its own, and accuracy must follow the scores."""
    tokenizer = AutoTokenizer.from_pretrained(STORIES)
    model = tiny_model("llama")
    model.resize_token_embeddings(len(tokenizer))
    examples = [Example("Once upon a time", [" there was a cat", " a", " the dog ran to the big red house"], 0),
                Example("The sun", [" was hot", " fell asleep in the park today"], 1)]
    expected_acc = expected_norm = 0
    with torch.no_grad():
        for e in examples:
            context = [tokenizer.bos_token_id] + tokenizer(e.context, add_special_tokens=False)["input_ids"]
            alone = []
            for c in e.continuations:
                answer = tokenizer(c, add_special_tokens=False)["input_ids"]
                logp = torch.log_softmax(model(torch.tensor([context + answer])).logits[0].float(), dim=-1)
                alone.append(sum(float(logp[len(context) - 1 + j, t]) for j, t in enumerate(answer)))
            assert choice_logprobs(model, tokenizer, e) == pytest.approx(alone, abs=1e-4)
            expected_acc += int(max(range(len(alone)), key=alone.__getitem__) == e.label)
            normed = [v / len(c) for v, c in zip(alone, e.continuations)]
            expected_norm += int(max(range(len(normed)), key=normed.__getitem__) == e.label)
    assert accuracy(model, tokenizer, examples) == {"acc": expected_acc / 2, "acc_norm": expected_norm / 2, "examples": 2}


def test_sparse_scoring_reaches_single_token_answers_and_long_contexts_keep_every_answer():
    from lte.baselines import METHODS

    from transformers import AutoModelForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(STORIES)
    model = AutoModelForCausalLM.from_pretrained(STORIES).eval()  # the real model: a random one scores all tokens alike
    short = Example("The cat sat on the mat and looked at the dog", [" no", " yes"], 1)
    dense = choice_logprobs(model, tokenizer, short)
    handle = METHODS["griffin"](model, 0.9, None)
    sparse = choice_logprobs(model, tokenizer, short, handle)
    handle.remove()
    assert handle.prefix == len(tokenizer(short.context)["input_ids"]) - 1  # context with BOS, minus its last token
    assert all(abs(a - b) > 1e-4 for a, b in zip(dense, sparse))  # the one answer token is predicted sparse
    long = Example("Once upon a time " * 40, [" a", " the little dog ran home"], 0)
    scores = choice_logprobs(model, tokenizer, long, max_length=24)
    assert all(score < 0 for score in scores)  # every choice keeps its answer tokens after truncation
