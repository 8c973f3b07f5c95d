"""SharedRequests: one framing of a client stream, followed by every backend it is written to.

Production and each shadow are written the same client bytes, each at its own pace (a
shadow's writes lag, coalesce or split differently). Instead of one RequestFramer per
backend parsing the same bytes again, the stream is framed once, by whichever
backend's writes first reach bytes not framed yet (production's, unless it stopped
framing), and each backend's RequestFollower hands out the requests its own writes
completed. A follower behaves like a RequestFramer fed with that backend's writes:
the same requests completed by the same write, the same `ends` and `in_message`, and
the same ProtocolError at the write that reaches the offset where the framing failed.

Memory: a follower holds the requests framed ahead of its writes, at most MAX_AHEAD;
one further behind (a stalled or slow shadow) keeps those and frames everything past
the last of them itself, with a framer of its own, which starts there exactly as the
shared one did (a request boundary is a clean state). The framing holds the followers'
queues, not the followers: nothing of a session forms a cycle, and a follower nobody
stopped (a shadow that never connected) goes with its session.
"""
from __future__ import annotations

from collections import deque

from . import ProtocolError, new_request_framer

# Most requests a follower may hold ahead of its writes before it frames on its own.
MAX_AHEAD = 1024
# In a follower's queue after the last request it was handed: it frames on its own from
# that request's end (see SharedRequests._cut).
ALONE = object()


class SharedRequests:
    """The framing of one client connection's requests, for the backends that follow it."""

    __slots__ = ("_framer", "_queues", "offset", "failed_at", "failure", "_marked",
                 "_protocol", "_max_head", "_native", "max_ahead", "parses")

    def __init__(self, protocol: str, max_head: int, max_ahead: int = MAX_AHEAD,
                 use_native: bool = True):
        """`use_native`: with the C parsers in front where installed (new_framers)."""
        self._protocol = protocol
        self._native = use_native
        self.max_ahead = max_ahead
        self._max_head = max_head
        self._framer = self._new_framer()
        self._framer.ends = []
        self._framer.starts = []
        self._queues: list[deque] = []  # each follower's requests ahead of its writes
        self.offset = 0          # bytes of the client stream framed so far
        self.failed_at = 0       # where framing failed (0: it has not)
        self.failure = ""        # ...and why
        self._marked = -1        # in_message holds from here for the request being framed
        self.parses = 0          # framer.feed() calls (what sharing saves is visible)

    def _new_framer(self):
        return new_request_framer(self._protocol, self._max_head, self._native)

    def follower(self) -> "RequestFollower":
        """A backend's view of the framing, from the first byte of the stream."""
        follower = RequestFollower(self)
        self._queues.append(follower.queue)
        return follower

    def leave(self, queue: deque) -> None:
        """The follower of `queue` takes no more requests."""
        queues = self._queues
        for index, held in enumerate(queues):
            if held is queue:  # by identity: deques compare by their contents
                del queues[index]
                return

    def frame(self, data, writer: deque) -> None:
        """Frame the next bytes of the client stream (starting at `offset`), written
        first to the backend of the follower whose queue is `writer`, and hand the
        requests they complete to each follower."""
        base = self.offset
        self.offset = base + len(data)
        if self.failed_at:
            return
        framer = self._framer
        ends, starts = framer.ends, framer.starts
        self.parses += 1
        try:
            done = framer.feed(data)
        except ProtocolError as error:
            done = error.completed
            self.failed_at = base + (len(data) if error.at is None else error.at)
            self.failure = str(error)
        # Every request begun is completed here or still being framed (also when the
        # framing failed in it); the first began in an earlier chunk if one was then.
        marks = starts if self._marked < 0 else [self._marked - base, *starts]
        count = len(done) if done else 0
        self._marked = base + marks[count] if len(marks) > count else -1
        if done:
            queues = self._queues
            for index, request in enumerate(done):
                entry = (base + marks[index], base + ends[index], request)
                for queue in queues:
                    queue.append(entry)
            # The writer takes its requests at once, whatever their number.
            for queue in [q for q in queues if len(q) > self.max_ahead and q is not writer]:
                self._cut(queue)
        ends.clear()
        starts.clear()

    def _cut(self, queue: deque) -> None:
        """A follower too far behind keeps its first max_ahead requests and then frames
        on its own from the end of the last of them; it takes no more from here."""
        while len(queue) > self.max_ahead:
            queue.pop()
        queue.append((-1, queue[-1][1], ALONE))
        self.leave(queue)

    def in_message_at(self, offset: int) -> bool:
        """Whether a backend written `offset` bytes, with no framed request ahead of it,
        is in the middle of one (the request being framed began before `offset`)."""
        return 0 <= self._marked <= offset


class RequestFollower:
    """One backend's RequestFramer, as far as its observer needs one: feed() with what
    was written to that backend, `ends`, `in_message`; stop() when it no longer frames."""

    __slots__ = ("_shared", "queue", "_written", "_alone", "_alone_from", "ends")

    def __init__(self, shared: SharedRequests):
        self._shared = shared
        # (in_message from, end, request) for the requests framed ahead of its writes
        self.queue: deque[tuple[int, int, object]] = deque()
        self._written = 0      # bytes of the stream written to this backend
        self._alone = None     # its own framer, once past an ALONE mark
        self._alone_from = 0   # ...which frames the stream from this offset on
        self.ends: list[int] | None = None

    @property
    def shared(self) -> SharedRequests:
        return self._shared

    def stop(self) -> None:
        """This backend no longer frames requests."""
        self._shared.leave(self.queue)
        self.queue.clear()

    @property
    def in_message(self) -> bool:
        """Some of a request has been written to this backend, not all of it."""
        written = self._written
        if self.queue:  # a request, never the mark: it goes with the request before it
            return self.queue[0][0] <= written
        if self._alone is not None:
            return self._alone.in_message
        return self._shared.in_message_at(written)

    def feed(self, data) -> list | None:
        """The requests completed by `data`, the next bytes written to this backend."""
        start = self._written
        end = start + len(data)
        self._written = end
        shared = self._shared
        queue = self.queue
        if (self._alone is None and end > shared.offset
                and not (queue and queue[-1][2] is ALONE)):
            shared.frame(data[shared.offset - start:], queue)  # the first to get these bytes
        out = None
        ends = self.ends
        while queue and queue[0][1] <= end:
            _, stop, request = queue.popleft()
            if request is ALONE:  # past the last request handed: its own framer's now
                self._alone = shared._new_framer()
                self._alone_from = stop
                continue
            if out is None:
                out = [request]
            else:
                out.append(request)
            if ends is not None:
                ends.append(stop - start)
        if self._alone is not None:
            if end > self._alone_from:
                out = self._feed_alone(data, start, out)
        elif shared.failed_at and end >= shared.failed_at:
            self.stop()
            raise ProtocolError(shared.failure, out or [])
        return out

    def _feed_alone(self, data, start: int, out: list | None) -> list | None:
        """Past where it went alone: its own framer frames the rest of `data`."""
        framer = self._alone
        skip = self._alone_from - start if self._alone_from > start else 0
        ends = self.ends
        if ends is not None and framer.ends is None:
            framer.ends = []
        try:
            done = framer.feed(data[skip:] if skip else data)
        except ProtocolError as error:
            error.completed = (out or []) + error.completed
            self._take_ends(skip)
            raise
        self._take_ends(skip)
        if done:
            return done if out is None else out + done
        return out

    def _take_ends(self, skip: int) -> None:
        framer = self._alone
        if framer.ends:
            if self.ends is not None:
                self.ends.extend(end + skip for end in framer.ends)
            framer.ends.clear()
