"""YAML files of options (``--config``, ablation grids, a run's ``config.yaml``), read safely: the safe loader,
one-line errors naming the file, and documents too large once their aliases are expanded refused unread."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

import yaml

from medkd.errors import MedkdError


#: Most values a YAML file of options may hold, counted with every alias expanded (an ablation grid of a hundred
#: cells holds about a thousand). A "billion laughs" file (aliases of aliases) is refused before it is built.
MAX_YAML_NODES = 100_000


def load_yaml(path: Path) -> Any:
    """Parse a YAML file (any top-level type) with the safe loader.

    The document's node graph is composed first and its size with every alias expanded is counted (cheaply: each
    distinct node once); more than :data:`MAX_YAML_NODES`, or an alias that contains itself, is refused before
    any Python object is built.

    Raises:
        MedkdError: unreadable, not UTF-8 text, invalid YAML, too large or nested too deeply (one line naming
            the file).
    """
    path = Path(path)
    try:
        loader = yaml.SafeLoader(path.read_text(encoding="utf-8"))
        try:
            node = loader.get_single_node()
            if node is None:
                return None
            n = expanded_size(node, MAX_YAML_NODES)
            if n > MAX_YAML_NODES:
                raise MedkdError(f"{path}: YAML too large: more than {MAX_YAML_NODES:,} values once its aliases "
                                 f"are expanded (or an alias that contains itself); refused unread")
            return loader.construct_document(node)
        finally:
            loader.dispose()
    except OSError as e:
        raise MedkdError(f"{path}: cannot read ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise MedkdError(f"{path}: not a UTF-8 text file (byte 0x{e.object[e.start]:02x} at offset {e.start}); "
                         f"expected YAML") from None
    except yaml.YAMLError as e:
        raise MedkdError(f"{path}: invalid YAML ({' '.join(str(e).split())[:150]})") from None
    except RecursionError:
        raise MedkdError(f"{path}: invalid YAML (nested too deeply)") from None


def expanded_size(root: "yaml.Node", limit: int) -> int:
    """Nodes of a composed YAML document with every alias expanded, i.e. what building it (and printing it) costs;
    counting stops above ``limit`` (returns ``limit + 1``), and an alias inside its own anchor counts as
    ``limit + 1``. Each distinct node is visited once (iteratively: deep documents cannot overflow the stack).
    """
    size: Dict[int, int] = {}
    open_: set = set()  # nodes entered and not finished: the current path from the root
    stack: List[tuple] = [(root, False)]
    while stack:
        node, done = stack.pop()
        kids = _yaml_children(node)
        if done:
            open_.discard(id(node))
            size[id(node)] = min(limit + 1, 1 + sum(size[id(k)] for k in kids))
            continue
        if id(node) in size:
            continue
        if id(node) in open_:
            return limit + 1  # recursive alias: infinitely large once expanded
        open_.add(id(node))
        stack.append((node, True))
        stack.extend((k, False) for k in kids if id(k) not in size)
    return size[id(root)]


def _yaml_children(node: "yaml.Node") -> List["yaml.Node"]:
    if isinstance(node, yaml.MappingNode):
        return [n for kv in node.value for n in kv]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def read_yaml(path: Path) -> Dict[str, Any]:
    """A YAML file of options: a mapping at the top level (an empty file is ``{}``)."""
    path = Path(path)
    doc = load_yaml(path) or {}
    if not isinstance(doc, dict):
        raise MedkdError(f"{path}: expected a mapping of options at the top level")
    return doc
