"""Duplicates review: one group at a time, members side by side; change the kept member, include or exclude."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, HorizontalScroll, Vertical
from textual.message import Message
from textual.reactive import reactive
from textual.screen import Screen
from textual.widgets import Button, Footer, Label, Static

from pipelines.filter import lifted_by_include
from tui.messages import CatalogChanged
from tui.preview import ImagePreview, load_preview
from tui.safe_text import markup_safe
from tui.screen_bar import ScreenBar
from tui.size_classes import SizeClasses
from tui.workers import people_message, toggle_message

MEMBER_COLUMNS = (
    "image_id", "is_keeper", "method", "distance", "keep_reason", "path", "width", "height", "format",
    "bytes", "excluded", "exclusion_reason", "excluded_by",
)
MAX_MEMBERS_SHOWN = 8


def includable(member: dict[str, Any]) -> bool:
    """Whether including by hand lifts an exclusion: it removes manual and filter ones, not a duplicate's."""
    return any(lifted_by_include(step) for step in member["excluded_by"])


def duplicate_group_ids(con, *, closest_calls_first: bool = False) -> list[int]:
    """Group ids in id order, or the closest calls first: the groups whose farthest pHash member is most bits away,
    where unrelated images grouped by mistake sit (groups joined by embeddings alone come last)."""
    order = ("max(distance) FILTER (WHERE method IN ('phash', 'mirror')) DESC NULLS LAST, group_id" if closest_calls_first
             else "group_id")
    cur = con.cursor()
    try:
        return [r[0] for r in cur.execute(f"SELECT group_id FROM duplicates GROUP BY group_id ORDER BY {order}").fetchall()]
    finally:
        cur.close()


def group_members(con, group_id: int) -> list[dict[str, Any]]:
    """Members of one duplicate group, keeper first, with what the review shows.

    One images_view lookup per member: an equality on image_id reaches the view's base tables,
    a join or IN list makes DuckDB build the whole view (100× slower on a large catalog).
    """
    cur = con.cursor()
    try:
        ids = [r[0] for r in cur.execute("SELECT image_id FROM duplicates WHERE group_id = ?", [group_id]).fetchall()]
        rows = []
        for image_id in ids:
            row = cur.execute(
                "SELECT d.image_id, d.is_keeper, d.method, d.distance, d.keep_reason, v.path, v.width, v.height, "
                "v.format, v.bytes, v.excluded, v.exclusion_reason, "
                "coalesce((SELECT list(DISTINCT e.step ORDER BY e.step) FROM exclusions e WHERE e.image_id = d.image_id), []), "
                "(SELECT arg_min(p.path_bytes, p.seq) FROM paths p WHERE p.image_id = d.image_id AND NOT p.missing) "
                "FROM duplicates d, images_view v WHERE d.image_id = ? AND v.image_id = ?",
                [image_id, image_id],
            ).fetchone()
            if row is not None:
                rows.append(row)
    finally:
        cur.close()
    rows.sort(key=lambda r: (not r[1], r[3] is not None, r[3] or 0, r[0]))  # keeper, then closest
    members = []
    for row in rows:
        member = dict(zip(MEMBER_COLUMNS, row[:-1]))
        member["file"] = os.fsdecode(bytes(row[-1])) if row[-1] is not None else member["path"]
        members.append(member)
    return members


def member_text(member: dict[str, Any]) -> str:
    keeper = "[b green]★ KEPT[/]" if member["is_keeper"] else "[yellow]duplicate[/]"
    # "duplicate of <64 hex>" wrapped over three lines of a 40-column card: ids are shown by 12 characters elsewhere too
    reason = re.sub(r"\b([0-9a-f]{12})[0-9a-f]{52}\b", r"\1", member["exclusion_reason"] or "")
    state = f"[red]excluded[/]: {markup_safe(reason)}" if member["excluded"] else "[green]in dataset[/]"
    distance = "·" if member["distance"] is None else f"{member['distance']:g}"
    size_kb = (member["bytes"] or 0) / 1024
    return (
        f"{keeper}  {member['image_id'][:12]}\n"
        f"{markup_safe(member['path'])}\n"
        f"{member['width']}×{member['height']} {member['format']}  {size_kb:,.1f} KiB\n"
        f"{member['method']} distance {distance}\n"
        f"{markup_safe(member.get('keep_reason') or '')}\n{state}"
    )


class MemberCard(Vertical, can_focus=True):
    """One member of the group: preview, facts, and the two actions."""

    DEFAULT_CSS = """
    MemberCard { width: 40; height: 1fr; border: round $primary-darken-3; padding: 0 1; margin-right: 1; }
    MemberCard.-selected { border: double $accent; }
    MemberCard.-keeper { background: $success 10%; }
    MemberCard ImagePreview { height: 14; }
    MemberCard Static { height: auto; }
    MemberCard Horizontal { height: 3; }
    MemberCard Button { width: 1fr; min-width: 8; }
    """

    def __init__(self, member: dict[str, Any], index: int) -> None:
        super().__init__(classes="-keeper" if member["is_keeper"] else "")
        self.member = member
        self.index = index

    def compose(self) -> ComposeResult:
        yield ImagePreview()
        yield Static(member_text(self.member), classes="member-facts")
        with Horizontal():
            yield Button("Keep this", name="keep", variant="success", disabled=bool(self.member["is_keeper"]))
            if self.member["excluded"] and not includable(self.member):
                # not disabled: a press says why it cannot include this copy and what to do (as x does)
                include = Button("Include", name="include", classes="-explains")
                include.tooltip = "Excluded as a duplicate (or by another step): Keep this instead."
                yield include
            elif self.member["excluded"]:
                yield Button("Include", name="include", variant="primary")
            else:
                yield Button("Exclude", name="exclude", variant="warning")

    def on_focus(self) -> None:
        self.screen.selected = self.index


class DuplicatesScreen(SizeClasses, Screen):
    """Walk the duplicate groups; the kept member is written to keeper_choice and the group recomputed."""

    CSS_PATH = "duplicates_screen.tcss"
    BINDINGS = [
        Binding("n", "group(1)", "Next group"),
        Binding("p", "group(-1)", "Prev group"),
        Binding("right", "member(1)", "Next member", show=False),
        Binding("left", "member(-1)", "Prev member", show=False),
        Binding("k", "keep", "Keep", tooltip="Keep the selected copy"),
        Binding("x", "toggle_exclude", "Exclude/include", tooltip="Exclude or include the selected copy"),
        Binding("a", "apart", "Not a dup", tooltip="The selected image is a picture of its own: out of its group"),
        Binding("u", "undo_apart", "Undo not-a-dup", show=False),
        Binding("o", "toggle_order", "Order", tooltip="Groups in id order, or the closest calls (farthest members) first"),
    ]

    selected: reactive[int] = reactive(0)

    @dataclass
    class _Groups(Message):
        group_ids: list[int]
        position: int

    @dataclass
    class _Members(Message):
        group_id: int
        members: list[dict[str, Any]]
        pictures: list[Any] = field(default_factory=list)

    @dataclass
    class _Changed(Message):
        text: str
        severity: str = "information"
        show_group: int | None = None  # the group to show next (after an undo, the one the image is back in)
        set_apart: str | None = None  # the image `a` took out of its group, for `u`

    @dataclass
    class _Failed(Message):
        error: str

    def __init__(self) -> None:
        super().__init__()
        self.group_ids: list[int] = []
        self.position = 0
        self.members: list[dict[str, Any]] = []
        self.set_apart: list[str] = []  # images `a` took out of their groups on this screen, for `u` to undo
        self.closest_calls_first = False  # `o`: review the doubtful groups first

    def compose(self) -> ComposeResult:
        yield ScreenBar("duplicates")
        with Horizontal(id="group-bar"):
            yield Button("◀ Prev (p)", id="prev")
            yield Label("loading groups…", id="group-label")
            yield Button("Next (n) ▶", id="next")
        yield HorizontalScroll(id="members")
        yield Footer()

    def on_mount(self) -> None:
        self.seen_version = self.app.catalog_version
        self._load_groups(None)

    def on_screen_resume(self) -> None:
        self.refresh_if_stale()

    def refresh_if_stale(self) -> None:
        """Reload the groups if the catalog changed since they were read."""
        if self.seen_version != self.app.catalog_version:
            self.seen_version = self.app.catalog_version
            self._load_groups(self.group_ids[self.position] if self.group_ids else None)

    @work(thread=True, exclusive=True, group="dup-groups")
    def _load_groups(self, keep_group: int | None) -> None:
        try:
            ids = duplicate_group_ids(self.app.con, closest_calls_first=self.closest_calls_first)
        except Exception as error:
            self.post_message(self._Failed(people_message(error)))
            return
        position = ids.index(keep_group) if keep_group in ids else 0
        self.post_message(self._Groups(ids, position))

    @on(_Groups)
    def _groups(self, message: _Groups) -> None:
        self.group_ids, self.position = message.group_ids, message.position
        if not self.group_ids:
            self.query_one("#group-label", Label).update("No duplicate groups. Run dedup on the Pipeline screen (F2).")
            self.query_one("#members").remove_children()
            return
        self._show_group()

    def _show_group(self) -> None:
        group_id = self.group_ids[self.position]
        order = " · closest calls first (o)" if self.closest_calls_first else ""
        self.query_one("#group-label", Label).update(f"group {self.position + 1:,} of {len(self.group_ids):,} · id {group_id}{order}")
        self._load_members(group_id)

    @work(thread=True, exclusive=True, group="dup-members")
    def _load_members(self, group_id: int) -> None:
        try:
            members = group_members(self.app.con, group_id)
        except Exception as error:
            self.post_message(self._Failed(people_message(error)))
            return
        pictures = [load_preview(m["file"], max_side=256) for m in members[:MAX_MEMBERS_SHOWN]]
        self.post_message(self._Members(group_id, members, pictures))

    @on(_Members)
    async def _members(self, message: _Members) -> None:
        if not self.group_ids or self.group_ids[self.position] != message.group_id:
            return
        # The selection follows the image, not the index: after Keep the keeper moves to the front.
        previous = self._selected_member()
        shown = message.members[:MAX_MEMBERS_SHOWN]
        ids = [m["image_id"] for m in shown]
        self.members = message.members
        if previous is not None and previous["image_id"] in ids:
            self.selected = ids.index(previous["image_id"])
        else:
            self.selected = min(self.selected, len(shown) - 1) if shown else 0
        box = self.query_one("#members")
        await box.remove_children()
        cards = [MemberCard(m, i) for i, m in enumerate(shown)]
        await box.mount_all(cards)
        for card, picture in zip(cards, message.pictures):
            card.query_one(ImagePreview).show(picture)
        if len(message.members) > MAX_MEMBERS_SHOWN:
            await box.mount(Static(f"+{len(message.members) - MAX_MEMBERS_SHOWN} more (see the browser: duplicate_group = {message.group_id})"))
        self.watch_selected(self.selected)

    def watch_selected(self, index: int) -> None:
        for card in self.query(MemberCard):
            card.set_class(card.index == index, "-selected")
            if card.index == index:  # a group wider than the screen: k, x and a act on the card you see
                card.scroll_visible(animate=False)

    # --- navigation ---------------------------------------------------------------

    @on(Button.Pressed, "#next")
    def _next(self) -> None:
        self.action_group(1)

    @on(Button.Pressed, "#prev")
    def _prev(self) -> None:
        self.action_group(-1)

    def action_group(self, delta: int) -> None:
        if self.group_ids:
            self.position = (self.position + delta) % len(self.group_ids)
            self.selected = 0
            self._show_group()

    def action_toggle_order(self) -> None:
        self.closest_calls_first = not self.closest_calls_first
        self.position, self.selected = 0, 0
        self._load_groups(None)  # from the first group of the new order

    def action_member(self, delta: int) -> None:
        cards = list(self.query(MemberCard))
        if cards:
            self.selected = (self.selected + delta) % len(cards)

    # --- changes --------------------------------------------------------------------

    @on(Button.Pressed, "MemberCard Button")
    def _card_button(self, event: Button.Pressed) -> None:
        card = next(a for a in event.button.ancestors if isinstance(a, MemberCard))
        self.selected = card.index
        if event.button.name == "keep":
            self.action_keep()
        else:
            self.action_toggle_exclude()

    def _selected_member(self) -> dict[str, Any] | None:
        return self.members[self.selected] if 0 <= self.selected < len(self.members) else None

    def action_keep(self) -> None:
        member = self._selected_member()
        if member and not member["is_keeper"]:
            self._change("keep", member["image_id"])

    def action_apart(self) -> None:
        member = self._selected_member()
        if member:
            self._change("apart", member["image_id"])

    def action_undo_apart(self) -> None:
        if not self.set_apart:
            self.notify("Nothing to undo: u undoes a (Not a dup) on this screen.", title="Duplicates", timeout=5)
            return
        self._change("rejoin", self.set_apart.pop())

    def action_toggle_exclude(self) -> None:
        member = self._selected_member()
        if member:
            self._change("toggle", member["image_id"])

    @work(thread=True, exclusive=True, group="dup-change")
    def _change(self, what: str, image_id: str) -> None:
        cur = self.app.con.cursor()
        severity = "information"
        show_group = apart = None
        try:
            if what == "apart":
                from pipelines.dedup import image_set_apart

                image_set_apart(cur, image_id)
                apart = image_id
                text = f"{image_id[:12]} is a picture of its own now, out of its group (u undoes it)"
            elif what == "rejoin":
                from pipelines.dedup import image_set_apart

                image_set_apart(cur, image_id, apart=False)
                row = cur.execute("SELECT group_id FROM duplicates WHERE image_id = ?", [image_id]).fetchone()
                show_group = row[0] if row else None
                text = f"{image_id[:12]} is back among its duplicates"
            elif what == "keep":
                from pipelines.dedup import choose_keeper, kept_but_excluded

                choose_keeper(cur, image_id)
                text = f"kept {image_id[:12]}; the group was recomputed"
                reason = kept_but_excluded(cur, image_id)
                if reason:
                    text += f". It is itself excluded ({reason}), so the dataset has no copy of this picture: x includes it."
                    severity = "warning"
            else:
                from pipelines.filter import toggled_exclusion

                text, severity = toggle_message(toggled_exclusion(cur, image_id, "excluded in duplicates review"),
                                                image_id, keep_hint="press k (Keep this) to keep it instead")
        except Exception as error:
            self.post_message(self._Failed(people_message(error)))
            return
        finally:
            cur.close()
        self.post_message(self._Changed(text, severity, show_group, apart))

    @on(_Changed)
    def _changed(self, message: _Changed) -> None:
        if message.set_apart:
            self.set_apart.append(message.set_apart)
        self.notify(message.text, title="Duplicates", severity=message.severity, timeout=10 if message.severity == "warning" else 5)
        self.post_message(CatalogChanged("duplicates"))
        self.seen_version = self.app.catalog_version + 1
        self._load_groups(message.show_group or (self.group_ids[self.position] if self.group_ids else None))

    @on(_Failed)
    def _failed(self, message: _Failed) -> None:
        self.notify(message.error, title="Duplicates", severity="error", timeout=8)
