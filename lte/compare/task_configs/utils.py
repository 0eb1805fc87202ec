"""HellaSwag's text cleaning, as lm-eval's ``hellaswag/utils.py`` does it (WikiHow's ``[title]``/``[step]`` tags)."""

import re


def preprocess(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def process_hellaswag(dataset):
    return dataset.map(
        lambda doc: {
            "query": preprocess(doc["ctx"]),
            "choices": [preprocess(e) for e in doc["endings"]],
            "label": int(doc["label"]),
        }
    )
