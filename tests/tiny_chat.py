"""A word-level chat tokenizer (ChatML template) and predictable synthetic conversations for
the training tests: the replies follow a fixed pattern a draft head can learn in seconds."""

from __future__ import annotations

import random

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)

WORDS = ("the a cat dog sat on mat ran to park is big small red blue one two three four five "
         "what where why how yes no please thanks hello world and or not it this that").split()


def tiny_tokenizer():
    """A word-level fast tokenizer with ChatML special tokens and a chat template."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<|im_start|>", "<|im_end|>"]
    vocab = {w: i for i, w in enumerate(specials + ["\n", " ", "user", "assistant", "system"] + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\n| |\w+"), behavior="isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<|im_end|>",
                                   pad_token="<|im_end|>", additional_special_tokens=specials[1:])
    fast.chat_template = CHATML
    return fast


def synthetic_conversations(n: int, seed: int = 0):
    """``n`` two-turn conversations whose replies repeat a pattern of the prompt's words."""
    rng = random.Random(seed)
    convs = []
    for _ in range(n):
        a = rng.sample(WORDS, 4)
        reply = " ".join(["yes", a[0], "is", a[1], "and", a[2], "is", a[3], "thanks"] * 2)
        convs.append([{"role": "user", "content": " ".join(a + ["please"])},
                      {"role": "assistant", "content": reply},
                      {"role": "user", "content": "why"},
                      {"role": "assistant", "content": "because " + " ".join(a)}])
    return convs
