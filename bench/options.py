"""The model-shape options the benches share: width, depth, sequence length and micro-batch."""


def add_model_shape(ap, *, hidden: int, layers: int, seq: int = None, micro: int = None, seq_flag: str = "--seq",
                    hidden_help: str = "model width"):
    """--hidden, --layers and, when given a default, the sequence length (`seq_flag`) and --micro."""
    ap.add_argument("--hidden", type=int, default=hidden, help=hidden_help)
    ap.add_argument("--layers", type=int, default=layers, help="decoder layers")
    if seq is not None:
        ap.add_argument(seq_flag, type=int, default=seq, help="tokens per sequence")
    if micro is not None:
        ap.add_argument("--micro", type=int, default=micro, help="sequences per micro-batch")
