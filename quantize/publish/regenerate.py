"""`quantize card --from-hub REPO`: re-render a published repo's card from what is on the Hub and
push README.md and the release's chart (size-vs-kld.png) only, to every branch, without touching
the weights.

What the card needs comes from the repo itself: the reproducibility record on each branch
(recipe, manifests, source config, prompt template), the file sizes of each branch, and the
original model card carried in the current README. The chart and "Which file should I choose?"
cover the whole release, so the records of its other repos (named by the recipe) are read too; a
sibling repo that is not on the Hub (yet) is left out, with a line in the log.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from huggingface_hub import CommitOperationAdd, CommitOperationDelete
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, RepositoryNotFoundError

from ..card.chart import CHART_FILE
from ..card.context import CardAssets, CardEntry, CardInputs
from ..card.original import OriginalCard, PromptTemplate, split_card
from ..card.render import render_card, render_release_chart
from ..errors import BadInput, WorkFailed
from ..formats import Format, all_formats
from ..manifest import Manifest
from ..recipe import Recipe
from . import BranchMoved
from .hub import HubTarget
from .layout import CARD_FILE, RECORD_FILE

ORIGINAL_START = "<!-- original-model-card start -->\n"
ORIGINAL_END = "<!-- original-model-card end -->"
INHERITED_KEYS = ("license", "license_name", "license_link", "datasets", "language")


@dataclass
class CardUpdate:
    branch: str
    changed: bool
    diff: str


def original_from_card(text: str) -> OriginalCard | None:
    """The original card a card of ours carries (body byte for byte, inherited metadata)."""
    metadata = {k: v for k, v in split_card(text).metadata.items() if k in INHERITED_KEYS}
    start = text.find(ORIGINAL_START)
    if start == -1:
        return OriginalCard(metadata, "") if metadata else None
    after_title = text.index("\n\n", start + len(ORIGINAL_START)) + 2
    end = text.rfind(ORIGINAL_END)
    return OriginalCard(metadata, text[after_title:end if end > after_title else len(text)])


class HubCardRegenerator:
    def __init__(self, target: HubTarget, log: Callable[[str], None] = print):
        self.target = target
        self.api = target.api
        self.log = log

    def _read(self, repo_id: str, path: str, branch: str) -> bytes | None:
        try:
            return Path(self.api.hf_hub_download(repo_id, path, revision=branch)).read_bytes()
        except EntryNotFoundError:
            return None

    def _records(self, repo_id: str) -> dict[str, dict]:
        try:
            branches = [ref.name for ref in self.api.list_repo_refs(repo_id).branches]
        except RepositoryNotFoundError:
            raise BadInput(f"card --from-hub: {repo_id} not found on the Hub (or the token can't see it)") from None
        except HfHubHTTPError as exc:
            raise BadInput(f"card --from-hub: {repo_id}: {type(exc).__name__}") from None
        records = {}
        for branch in branches:
            data = self._read(repo_id, RECORD_FILE, branch)
            if data is not None:
                records[branch] = json.loads(data)
        if not records:
            raise BadInput(f"card --from-hub: no branch of {repo_id} has {RECORD_FILE}: was it published by quantize?")
        return records

    def _manifests(self, repo_id: str, records: dict[str, dict]) -> dict[str, Manifest]:
        """Each variant's manifest, with file sizes as the Hub holds them now."""
        manifests = {}
        for branch, record in records.items():
            sizes = {entry.path: (entry.lfs.size if entry.lfs else entry.size)
                     for entry in self.api.list_repo_tree(repo_id, revision=branch, recursive=True)
                     if hasattr(entry, "size")}
            for raw in record["variants"]:
                manifest = Manifest.model_validate(raw)
                for entry in manifest.files:
                    entry.size = sizes.get(manifest.repo_path(entry), entry.size)
                manifests[manifest.variant_id] = manifest
        return manifests

    @staticmethod
    def _ordered(record: dict, manifests: dict[str, Manifest]) -> list[Manifest]:
        order = {variant_id: index for index, variant_id in enumerate(record.get("release_variants") or [])}
        return sorted(manifests.values(), key=lambda m: (order.get(m.variant_id, len(order)), m.variant_id))

    def _sibling_entries(self, recipe: Recipe, record: dict, plugin: Format) -> list[CardEntry]:
        """The published variants of another repo of the release (none when it is not on the Hub)."""
        repo_id = recipe.release.repo_id(plugin.title)
        try:
            manifests = self._manifests(repo_id, self._records(repo_id))
        except BadInput:
            self.log(f"{repo_id}: no published record found: its files are left out of the chart and the choice")
            return []
        return [CardEntry.from_manifest(m) for m in self._ordered(record, manifests) if m.format == plugin.name]

    def inputs(self, repo_id: str) -> tuple[CardInputs, str, list[str]]:
        """The card inputs the published records hold (this repo's, and its sibling repos' for the
        release-wide parts), the repo's format, and the branches with a record."""
        records = self._records(repo_id)
        record = records.get("main") or next(iter(records.values()))
        recipe = Recipe.model_validate({**record["recipe"], "base_dir": Path.cwd()})
        manifests = self._manifests(repo_id, records)
        formats = {m.format for m in manifests.values()}
        if len(formats) != 1:
            raise BadInput(f"card --from-hub: the records on {repo_id} describe {len(formats)} formats")
        current = self._read(repo_id, CARD_FILE, "main")
        original = original_from_card(current.decode("utf-8")) if current else None
        fmt = formats.pop()
        entries = {}
        for plugin in all_formats():  # the release's formats, in plan order
            if plugin.name == fmt:
                entries[fmt] = [CardEntry.from_manifest(m) for m in self._ordered(record, manifests)]
            elif getattr(recipe, plugin.name, None) is not None:
                entries[plugin.name] = self._sibling_entries(recipe, record, plugin)
        inputs = CardInputs(recipe, record.get("source_config"), entries, original,
                            PromptTemplate(**record["prompt_template"]), CardAssets.from_dict(record.get("card")))
        return inputs, fmt, list(records)

    def render(self, repo_id: str) -> tuple[str, list[str]]:
        """The card re-rendered from the Hub, and the branches that carry a record."""
        inputs, fmt, branches = self.inputs(repo_id)
        return render_card(inputs, fmt), branches

    def _operations(self, repo_id: str, revision: str, text: str, chart: bytes | None) -> tuple[list, str]:
        """What to commit on one branch (README.md, the chart, the record's list of owned files when the
        chart joins or leaves it), and the README there now."""
        current = (self._read(repo_id, CARD_FILE, revision) or b"").decode("utf-8")
        operations = [] if current == text else [CommitOperationAdd(path_in_repo=CARD_FILE,
                                                                    path_or_fileobj=text.encode())]
        raw = self._read(repo_id, RECORD_FILE, revision)
        record = json.loads(raw) if raw else {}
        owned = list(record.get("files") or [])
        held = self._read(repo_id, CHART_FILE, revision)
        if chart is not None and held != chart:
            operations.append(CommitOperationAdd(path_in_repo=CHART_FILE, path_or_fileobj=chart))
        elif chart is None and held is not None and CHART_FILE in owned:
            operations.append(CommitOperationDelete(path_in_repo=CHART_FILE))  # ours, and nothing to chart now
        listed = sorted({*owned, CHART_FILE} if chart is not None else set(owned) - {CHART_FILE})
        if "files" in record and listed != sorted(owned):
            record["files"] = listed
            operations.append(CommitOperationAdd(path_in_repo=RECORD_FILE,
                                                 path_or_fileobj=(json.dumps(record, indent=2) + "\n").encode()))
        return operations, current

    def regenerate(self, repo_id: str, dry_run: bool = False) -> list[CardUpdate]:
        inputs, fmt, branches = self.inputs(repo_id)
        text, chart = render_card(inputs, fmt), render_release_chart(inputs)
        updates = []
        for branch in branches:
            for attempt in range(2):  # on top of the head read; a branch that moved meanwhile is read again, once
                head = (self.target._heads(repo_id) or {}).get(branch)
                operations, current = self._operations(repo_id, head or branch, text, chart)
                if not operations or dry_run:
                    break
                try:
                    self.target._retrying(f"pushing the card to {branch}", repo_id, lambda b=branch, h=head, o=operations:
                                          self.api.create_commit(repo_id, operations=o, revision=b, parent_commit=h,
                                                                 commit_message="quantize: regenerate model card"),
                                          branch)
                    self.log(f"{repo_id}@{branch}: card updated ({', '.join(op.path_in_repo for op in operations)})")
                    break
                except BranchMoved:
                    if attempt:
                        raise WorkFailed(f"card --from-hub: {repo_id}@{branch} changed while its card was "
                                         "being pushed, twice: rerun") from None
            diff = "".join(difflib.unified_diff(current.splitlines(True), text.splitlines(True),
                                                f"{branch}/README.md (Hub)", f"{branch}/README.md (new)"))
            updates.append(CardUpdate(branch, bool(operations), diff))
        return updates
