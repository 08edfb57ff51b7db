"""Reading YAML whose work is bounded by its size: the one way zhllama parses a YAML document.

`yaml.safe_load` runs no code, but it expands aliases: a 566-byte document of nested anchors (the
"billion laughs") is a few hundred nodes on disk and 9^9 values once anything walks it (copying a
config, dumping it, checking its items), which took 2.6 GB and never ended in `zhllama train
--dry-run`. Here the document is composed into its node graph first (aliases are shared nodes, so this
is cheap), the graph is measured, and only a document whose aliases add at most `MAX_ALIAS_NODES`
nodes, with no alias inside its own anchor, and no deeper than `MAX_DEPTH`, is turned into Python
values. Every failure is one `UserError` naming the source (a file, or "override 'key=value'").
"""

from typing import Optional

import yaml

from zhllama.errors import ConfigError, InputError
from zhllama.inputfile import read_text

MAX_ALIAS_NODES = 10_000  # nodes aliases may add beyond those written out (real configs: a handful)
MAX_DEPTH = 100           # nesting of sequences and mappings (real configs: 3)
MAX_FILE_BYTES = 4_000_000  # a run config (real ones: a few KB)


def _measure(root) -> tuple:
    """(nodes as written, nodes once every alias is expanded, deepest nesting), without expanding:
    shared nodes are counted once for the first and as often as they are reached for the second
    (memoised, so an alias bomb costs its size on disk). A node reached from inside itself raises."""
    written, expanded, depth, on_path = set(), {}, {}, set()
    stack = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        children = ([v for kv in node.value for v in kv] if isinstance(node, yaml.MappingNode)
                    else list(node.value) if isinstance(node, yaml.SequenceNode) else [])
        if done:
            on_path.discard(key)
            expanded[key] = 1 + sum(expanded[id(c)] for c in children)
            depth[key] = 1 + max((depth[id(c)] for c in children), default=0)
            continue
        if key in expanded:
            continue
        if key in on_path:
            raise ValueError("an alias refers to the anchor it is inside (a recursive document)")
        written.add(key)
        on_path.add(key)
        stack.append((node, True))
        for c in children:
            if id(c) in on_path:
                raise ValueError("an alias refers to the anchor it is inside (a recursive document)")
            if id(c) not in expanded:
                stack.append((c, False))
    return len(written), expanded[id(root)], depth[id(root)]


def load_yaml(text: str, source: str, what: str = "YAML file"):
    """The Python value of the YAML document `text` (None when empty); an InputError naming `source` and
    the line when it is not YAML, a ConfigError when it is recursive, nests deeper than MAX_DEPTH or its
    aliases add more than MAX_ALIAS_NODES nodes."""
    loader = yaml.SafeLoader(text)
    try:
        node: Optional[yaml.Node] = loader.get_single_node()
        if node is None:
            return None
        written, expanded, depth = _measure(node)
        if depth > MAX_DEPTH:
            raise ConfigError(f"{source}: YAML nested {depth} levels deep (at most {MAX_DEPTH})")
        if expanded - written > MAX_ALIAS_NODES:
            raise ConfigError(f"{source}: YAML aliases expand {written:,} nodes to {expanded:,} (at most "
                              f"{MAX_ALIAS_NODES:,} more than written; an alias bomb?): write the values out "
                              "instead of using anchors")
        return loader.construct_document(node)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise InputError(source, f"not a valid {what}: {problem}", mark.line + 1 if mark else None) from None
    except RecursionError:
        raise ConfigError(f"{source}: YAML nested too deeply to read (at most {MAX_DEPTH} levels)") from None
    except ValueError as e:  # a recursive alias; an integer literal of more than 4300 digits
        raise ConfigError(f"{source}: cannot read the YAML: {e}") from None
    finally:
        loader.dispose()


def read_yaml_file(path, what: str = "YAML file"):
    """`load_yaml` of a UTF-8 file of at most MAX_FILE_BYTES (read by `inputfile.read_text`: a FIFO,
    a device, a broken link or a BOM handled as for any input), every failure one UserError naming it
    and calling it `what` ("run config file")."""
    return load_yaml(read_text(path, "input", max_bytes=MAX_FILE_BYTES), str(path), what)
