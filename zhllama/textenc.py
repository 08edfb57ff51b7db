"""User text to token ids, with control tokens never parsed out of it.

A record, a chat message or an eval line may contain the literal strings "</s>" or "<s>". Read as
control tokens they would teach the model to stop mid-answer or let a chat user forge turns, and
`data pack` (raw SentencePiece, which never parses them) would disagree with every other stage on the
same text. So every stage encodes user text here, with special-token parsing off, and inserts
BOS/EOS and template control tokens by id only.
"""


def encode_text(tokenizer, text: str) -> list:
    """Ids of `text` as plain text: no BOS/EOS added, no "</s>"-like substring read as a control token."""
    return list(tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])
