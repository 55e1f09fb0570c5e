"""EncoderCacheManager: which image embeddings the runner holds, and who still needs them.

Sizes are in image tokens (an image's placeholder length). Each image identifier is encoded
once and shared by every request (and every image of a request) with that identifier::

    entry "sha256:ab.."  600 tokens  users {("req-1", 0), ("req-7", 2)}
    entry "sha256:cd.."  576 tokens  users {}         <- unused: kept for reuse, LRU-evicted

A user is added in the step whose token range first reaches the image's placeholder (the
image is encoded in that step unless already cached) and removed once the request has
computed the whole placeholder, or when it finishes or is preempted. An unused entry stays
until its room is needed; evicted identifiers are reported once through
``take_freed_identifiers`` so the runner can drop them.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from caldera.scheduler.request import Request


@dataclass(slots=True)
class EncoderPlan:
    """The outcome of ``plan``: how many tokens may be scheduled, which images (indices into
    the request's images) must be encoded this step, which are already cached."""

    num_tokens: int
    to_encode: list[int] = field(default_factory=list)
    cached: list[int] = field(default_factory=list)
    num_encoder_tokens: int = 0


@dataclass(slots=True)
class _Entry:
    num_tokens: int
    users: set[tuple[str, int]] = field(default_factory=set)


class EncoderCacheManager:
    def __init__(self, cache_size: int) -> None:
        self.cache_size = cache_size
        self._entries: dict[str, _Entry] = {}
        self._unused: OrderedDict[str, None] = OrderedDict()
        self._num_free = cache_size
        self._num_unused_tokens = 0
        self._held: dict[str, set[int]] = {}
        self._freed: dict[str, None] = {}

    @property
    def usage(self) -> float:
        """Fraction of the cache held by images some request still needs."""
        used = self.cache_size - self._num_free - self._num_unused_tokens
        return used / self.cache_size

    def is_cached(self, identifier: str) -> bool:
        return identifier in self._entries

    def plan(self, request: Request, start: int, num_tokens: int, budget: int) -> EncoderPlan:
        """Fits tokens ``start .. start + num_tokens - 1`` of the request to the encoder.

        Every image whose placeholder overlaps the range must be cached or encoded this step,
        within ``budget`` image tokens and the cache's room; the range is cut at the
        placeholder of the first image that does not fit (possibly to zero tokens). Changes
        nothing: ``commit`` applies the plan once the request is scheduled.
        """
        end = start + num_tokens
        result = EncoderPlan(num_tokens)
        held = self._held.get(request.request_id, ())
        seen: set[str] = set()
        room = self._num_free + self._num_unused_tokens
        for index, image in enumerate(request.images):
            if image.end <= start or index in held:
                continue
            if image.offset >= end:
                break
            identifier = image.identifier
            entry = self._entries.get(identifier)
            if identifier in seen or entry is not None:
                if entry is not None and not entry.users and identifier not in seen:
                    room -= entry.num_tokens  # about to be used: no longer evictable
                result.cached.append(index)
            elif image.length <= budget - result.num_encoder_tokens and image.length <= room:
                room -= image.length
                result.num_encoder_tokens += image.length
                result.to_encode.append(index)
            else:
                end = image.offset
                break
            seen.add(identifier)
        result.num_tokens = max(end - start, 0)
        return result

    def commit(self, request: Request, plan: EncoderPlan) -> None:
        """Adds the request as a user of the planned images, making entries for the ones to
        encode (evicting unused entries as needed). ``plan.to_encode`` is left holding the
        images the runner must encode this step."""
        req_id = request.request_id
        images = request.images
        pending = []
        for index in plan.cached:
            if images[index].identifier in self._entries:
                self._add_user(request, index)
            else:
                pending.append(index)
        to_encode = []
        for index in plan.to_encode:
            image = images[index]
            self._make_room(image.length)
            self._entries[image.identifier] = _Entry(image.length)
            self._num_free -= image.length
            if image.identifier in self._freed:
                # Evicted in this step, so the runner was not told yet and still holds it.
                del self._freed[image.identifier]
                plan.num_encoder_tokens -= image.length
            else:
                to_encode.append(index)
            self._add_user(request, index)
        plan.to_encode = to_encode
        for index in pending:
            self._add_user(request, index)
        if not self._held.get(req_id):
            self._held.pop(req_id, None)

    def release_computed(self, request: Request) -> None:
        """Drops the request's use of images whose placeholder it has fully computed."""
        held = self._held.get(request.request_id)
        if not held:
            return
        computed = request.num_computed_tokens
        images = request.images
        for index in [i for i in held if images[i].end <= computed]:
            self._remove_user(request, index)
        if not held:
            del self._held[request.request_id]

    def free(self, request: Request) -> None:
        """Drops every use the request holds (finish, abort, preemption)."""
        held = self._held.get(request.request_id)
        if not held:
            return
        for index in list(held):
            self._remove_user(request, index)
        del self._held[request.request_id]

    def take_freed_identifiers(self) -> list[str]:
        """Identifiers evicted since the last call; the runner may drop their outputs."""
        freed = list(self._freed)
        self._freed.clear()
        return freed

    def _add_user(self, request: Request, index: int) -> None:
        identifier = request.images[index].identifier
        entry = self._entries[identifier]
        if identifier in self._unused:
            del self._unused[identifier]
            self._num_unused_tokens -= entry.num_tokens
        entry.users.add((request.request_id, index))
        self._held.setdefault(request.request_id, set()).add(index)

    def _remove_user(self, request: Request, index: int) -> None:
        identifier = request.images[index].identifier
        entry = self._entries[identifier]
        entry.users.discard((request.request_id, index))
        self._held[request.request_id].discard(index)
        if not entry.users:
            self._unused[identifier] = None
            self._num_unused_tokens += entry.num_tokens

    def _make_room(self, num_tokens: int) -> None:
        while self._num_free < num_tokens:
            identifier, _ = self._unused.popitem(last=False)
            entry = self._entries.pop(identifier)
            self._num_free += entry.num_tokens
            self._num_unused_tokens -= entry.num_tokens
            self._freed[identifier] = None
