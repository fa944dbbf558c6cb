"""The fetch loop's mailbox: commands posted from other threads wake the loop's select and come
out in the order posted."""

from __future__ import annotations

import select
import threading

from fastpull.engine.commands import Mailbox, Stop


def test_posted_commands_wake_the_fd_and_drain_in_order():
    mailbox = Mailbox()
    try:
        assert select.select([mailbox.fd], [], [], 0)[0] == []
        commands = [Stop() for _ in range(3)]
        poster = threading.Thread(target=lambda: [mailbox.post(c) for c in commands])
        poster.start()
        assert select.select([mailbox.fd], [], [], 30)[0] == [mailbox.fd]  # woken by the kernel
        poster.join()
        assert [id(c) for c in mailbox.drain()] == [id(c) for c in commands]
        assert select.select([mailbox.fd], [], [], 0)[0] == []  # quiet until the next post
        assert list(mailbox.drain()) == [] and mailbox.get(block=False) is None
        mailbox.post(commands[0])
        assert mailbox.get(block=False) is commands[0]
    finally:
        mailbox.close()
