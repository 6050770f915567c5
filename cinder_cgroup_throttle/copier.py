"""The pv fallback's copier: Cinder's dd, done in the wrapper, block by block as pv allows.

pv paces a stream of tokens, one byte per :data:`UNIT` bytes of the copy, read from
``/dev/zero`` into a pipe; this copier reads them and copies as many bytes as they allow,
a block (dd's ``bs=``) at a time, with the flags Cinder gave its dd. So no byte of the copy
passes through a pipe or pv: a dd behind pv copied every byte out of the pipe (``read(2)``
from a pipe always copies, ~0.16 s of CPU per GiB here, three times a bare O_DIRECT dd's
whole cost), and pv could not read with O_DIRECT (splice refuses it), filling the page cache
that Cinder's ``iflag=direct`` keeps out of it.

dd's semantics that Cinder relies on are kept: ``count=`` bytes at most (``iflag=
count_bytes``), ``iflag=direct``/``oflag=direct`` (a final partial block written without
O_DIRECT, as dd does), ``conv=sparse`` (blocks of zeros skipped), ``conv=fdatasync``, a
regular destination truncated at open (dd's default without ``conv=notrunc``).

Stdlib only: part of the wrapper's start-up. It runs as a thread of the wrapper.
"""
from __future__ import annotations

import fcntl
import mmap
import os
import stat
import time
from typing import Optional

#: Bytes of the copy per token pv passes: a sector, so that pv's rate (bytes/s / UNIT)
#: rounds by less than 0.01 % for rates of 5 MB/s and more (less than 1 % from 52 kB/s).
UNIT = 512


#: pv keeps the credit of a stall (the copier descheduled, the destination slow) and hands
#: it over as fast as it is taken: measured, 16 MiB at once after 8 s stopped at 2 MiB/s.
#: The copier takes at most this many seconds of the rate beyond its pace (and a block), so
#: a stall costs the copy time, as under blk-throttle, instead of a burst afterwards.
CATCH_UP = 1.0


def tokens(nbytes: int) -> int:
    """Tokens that allow ``nbytes`` (the last one may allow more than is left)."""
    return -(-nbytes // UNIT)


class Copier:
    """Copies ``source`` to ``dest`` as tokens arrive on ``pipe``; run :meth:`run` in its
    own thread. ``granted`` bytes may be copied before any token (the head start).
    ``rate`` (bytes/s, kept equal to pv's by the wrapper) bounds a catch-up
    (:data:`CATCH_UP`).

    ``done`` is the byte count written so far (read by the wrapper for its progress),
    ``error`` the OSError that ended the copy, ``seconds`` its duration once ended, and
    ``ended`` an eventfd that becomes readable then.
    """

    def __init__(self, pipe: int, source: int, dest: str, expected: Optional[int],
                 block: int, direct: bool, sparse: bool, fdatasync: bool, rate: int,
                 source_name: str = 'the source') -> None:
        self.pipe, self.source, self.dest, self.expected = pipe, source, dest, expected
        self.block, self.direct, self.sparse, self.fdatasync = block, direct, sparse, fdatasync
        self.rate = rate
        self.granted = 0
        self._allowance = 0.0  # bytes the pace allows now (see _pace), as of _stamp
        self._stamp = 0.0
        self.done = 0
        self.error: Optional[OSError] = None
        self.seconds: Optional[float] = None
        self.ended = os.eventfd(0, os.EFD_CLOEXEC)
        self._out = -1
        # Page-aligned, as O_DIRECT needs; one sector more for a rounded-up last read.
        self._buffer = mmap.mmap(-1, block + UNIT)
        self._zeros = bytes(block) if sparse else b''  # what a skipped block holds
        # What failed, for the error: set before each step (prebuilt: no cost per block).
        self._steps = ('reading %s' % source_name, 'writing %s' % dest,
                       'fdatasync of %s' % dest, 'reading pv\'s tokens')
        self._step = self._steps[0]
        self._seeked = False  # the last block was skipped (sparse): extend a regular file
        self._tail_buffered = False  # a final partial block went through the page cache

    def open(self) -> None:
        """Open the destination as dd does; OSError naming it when that fails."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOCTTY
        try:
            self._out = os.open(self.dest, flags | (os.O_DIRECT if self.direct else 0),
                                0o666)
            if stat.S_ISREG(os.fstat(self._out).st_mode):
                os.ftruncate(self._out, 0)
        except OSError as exc:
            raise OSError(exc.errno, 'cannot open %s for writing: %s'
                          % (self.dest, os.strerror(exc.errno))) from None

    def run(self) -> None:
        """The copy, to ``expected`` bytes or the source's end, or until the tokens end
        (pv stopped); errors end up in ``error``."""
        started = self._stamp = time.monotonic()
        self._allowance = self.granted + self._cap()
        view = memoryview(self._buffer)
        try:
            while self.expected is None or self.done < self.expected:
                want = self.block if self.expected is None \
                    else min(self.block, self.expected - self.done)
                while self.granted - self.done < want:
                    self._step = self._steps[3]
                    more = os.read(self.pipe, 1 << 16)
                    if not more:  # pv ended: copy what it allowed
                        want = self.granted - self.done
                        break
                    self.granted += len(more) * UNIT
                if want > 0:
                    self._pace(want)
                if want <= 0 or not self._copy_block(view, want):
                    break
            self._finish()
        except OSError as exc:
            self.error = OSError(exc.errno, '%s at byte %d failed: %s' % (
                self._step, self.done, os.strerror(exc.errno)))
        finally:
            view.release()
            self.seconds = time.monotonic() - started
            for fd in (self.pipe, self._out):  # pv, if still running, gets EPIPE
                if fd >= 0:
                    os.close(fd)
            os.eventfd_write(self.ended, 1)

    def _cap(self) -> float:
        return self.rate * CATCH_UP + self.block

    def _pace(self, want: int) -> None:
        """Wait until the allowance, growing at ``rate`` up to :meth:`_cap` (beyond that
        only the head start it began with), covers ``want``; take it. While the tokens
        come at pv's pace it always does: it binds only on a catch-up."""
        while True:
            now, cap = time.monotonic(), self._cap()
            grown = self._allowance + self.rate * (now - self._stamp)
            self._allowance = grown if grown <= cap else max(self._allowance, cap)
            self._stamp = now
            if self._allowance >= want:
                self._allowance -= want
                return
            time.sleep((want - self._allowance) / self.rate)

    def _copy_block(self, view: memoryview, want: int) -> int:
        """Copy ``want`` bytes at ``done``; the bytes copied, 0 at the source's end."""
        got = 0
        self._step = self._steps[0]
        while got < want:
            # O_DIRECT reads whole sectors: the last one may hold bytes beyond ``want``.
            n = os.preadv(self.source, [view[got:tokens(want) * UNIT]], self.done + got)
            if not n:
                break
            got += n
        got = min(got, want)
        if not got:
            return 0
        self._step = self._steps[1]
        if self.sparse and view[:got] == self._zeros[:got]:
            self._seeked = True
        else:
            self._write(view[:got], self.done)
            self._seeked = False
        self.done += got
        return got

    def _write(self, data: memoryview, offset: int) -> None:
        """A block that O_DIRECT cannot take (not whole sectors) goes through the page
        cache, as dd writes its last partial block."""
        if self.direct and len(data) % UNIT:
            fcntl.fcntl(self._out, fcntl.F_SETFL,
                        fcntl.fcntl(self._out, fcntl.F_GETFL) & ~os.O_DIRECT)
            self._tail_buffered = True
        written = 0
        while written < len(data):
            written += os.pwrite(self._out, data[written:], offset + written)

    def _finish(self) -> None:
        if self._seeked:
            st = os.fstat(self._out)
            if stat.S_ISREG(st.st_mode) and st.st_size < self.done:
                os.ftruncate(self._out, self.done)
        if self.fdatasync or self._tail_buffered:
            self._step = self._steps[2]
            os.fdatasync(self._out)

    def report(self) -> str:
        """dd's summary line, on this copier's clock (what :mod:`ddstats` reads)."""
        seconds = self.seconds or 0.0
        return '%d bytes (%.1f MB, %.1f MiB) copied, %.6f s, %.1f MB/s' % (
            self.done, self.done / 1e6, self.done / (1 << 20), seconds,
            self.done / seconds / 1e6 if seconds else 0.0)
