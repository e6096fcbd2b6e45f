# Copyright (c) 2026, fla-mesa contributors. MIT license.
"""
A local corpus and tokenizer for flame runs on machines with no network (no download anywhere).

Documents are sentences of a made-up language: a first-order Markov chain over a Zipf-distributed vocabulary of
words (so a model's loss has far to fall: from log(vocab) at the start to the chain's entropy), and each document
repeats some of its own earlier phrases verbatim (so recalling the context pays, which a recurrent layer must learn).
Writes `<out>/corpus.jsonl` ({"text": ...} a line, what flame reads with `--training.dataset json`) and a byte-level
BPE tokenizer in `<out>/tokenizer` that prepends <s> to every document (flame's varlen mode splits at <s>).

    python scripts/flame/make_corpus.py --out /tmp/mesa_corpus --docs 20000
"""

import argparse
import json
import os

import numpy as np


def make_documents(n_docs: int, n_words: int = 2000, seed: int = 0):
    rng = np.random.default_rng(seed)
    letters = list('abcdefghijklmnopqrstuvwxyz')
    words = sorted({''.join(rng.choice(letters, size=rng.integers(2, 9))) for _ in range(3 * n_words)})[:n_words]
    # each word's successors: a few dozen candidates, Zipf-weighted
    zipf = 1.0 / np.arange(1, 33) ** 1.1
    zipf /= zipf.sum()
    successors = rng.integers(0, n_words, size=(n_words, 32))
    for _ in range(n_docs):
        length = int(rng.integers(50, 600))
        w = int(rng.integers(0, n_words))
        text = []
        while len(text) < length:
            if len(text) > 20 and rng.random() < 0.05:
                # copy an earlier phrase of this document
                start = int(rng.integers(0, len(text) - 10))
                text += text[start:start + int(rng.integers(4, 11))]
                w = words.index(text[-1])
                continue
            w = int(successors[w, rng.choice(32, p=zipf)])
            text.append(words[w])
        yield ' '.join(text) + '.'


def train_tokenizer(corpus: str, out: str, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=['<unk>', '<s>', '</s>'],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())

    def texts():
        with open(corpus) as f:
            for line in f:
                yield json.loads(line)['text']

    tok.train_from_iterator(texts(), trainer=trainer)
    bos = tok.token_to_id('<s>')
    tok.post_processor = processors.TemplateProcessing(single='<s> $A', pair='<s> $A <s> $B', special_tokens=[('<s>', bos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token='<unk>', bos_token='<s>', eos_token='</s>')
    fast.save_pretrained(out)
    return fast


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--out', required=True)
    parser.add_argument('--docs', type=int, default=20000)
    parser.add_argument('--vocab_size', type=int, default=4096)
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args()
    if args.docs < 1 or args.vocab_size < 300:
        raise ValueError(f"--docs must be >= 1 and --vocab_size >= 300, got {args.docs} and {args.vocab_size}")
    os.makedirs(args.out, exist_ok=True)
    corpus = os.path.join(args.out, 'corpus.jsonl')
    with open(corpus, 'w') as f:
        for text in make_documents(args.docs, seed=args.seed):
            f.write(json.dumps({'text': text}) + '\n')
    tok = train_tokenizer(corpus, os.path.join(args.out, 'tokenizer'), args.vocab_size)
    ids = tok('hello world')['input_ids']
    print(f"{corpus}: {args.docs} documents; tokenizer: vocab {tok.vocab_size}, bos {tok.bos_token_id}, "
          f"eos {tok.eos_token_id}; 'hello world' -> {ids}")


if __name__ == '__main__':
    main()
