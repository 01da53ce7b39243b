"""Example tasks run by the example configuration (pgsched.toml.example).

Try them from another shell while `pgsched worker` runs:

    pgsched add send_welcome_email --kwargs '{"address": "ada@example.com"}'
    pgsched add resize_image --args '["cat.png", 128]' --in 10s
    pgsched add flaky_webhook --retries 3
    pgsched schedules                      # the @periodic schedules below
    pgsched add resize_image --args '["logo.png", 64]' --cron "0 9 * * MON-FRI" \
        --tz Europe/Paris --id morning-logo
"""

import asyncio
import hashlib
import random
from datetime import timedelta

from pgsched import JobPriority, periodic, task


@task(max_retries=3, timeout=30)
async def send_welcome_email(address: str, name: str = "there") -> dict:
    """I/O-bound work belongs in `async def`: it runs on the worker's event loop."""
    await asyncio.sleep(0.2)  # stands in for an SMTP round trip
    return {"to": address, "subject": f"Welcome, {name}!"}


@task(timeout=60)
def resize_image(path: str, width: int) -> dict:
    """CPU-bound or blocking work belongs in a plain `def`: it runs in a thread."""
    digest = hashlib.sha256(f"{path}:{width}".encode()).hexdigest()
    return {"path": path, "width": width, "thumbnail": f"{digest[:12]}.png"}


@task(max_retries=5, priority=JobPriority.CRITICAL)
async def flaky_webhook(url: str = "https://example.com/hook") -> str:
    """Fails now and then, to show retries with backoff in the logs."""
    await asyncio.sleep(0.05)
    if random.random() < 0.5:
        raise ConnectionError(f"{url} did not answer")
    return "delivered"


@periodic(every=timedelta(minutes=15))
async def cleanup_temp_files() -> int:
    """Runs on every quarter hour (UTC), once per window however many workers run."""
    await asyncio.sleep(0.01)
    return 0


@periodic(cron="0 9 * * MON-FRI", tz="America/New_York", max_retries=2, timeout=300)
def market_open_report() -> str:
    """09:00 New York time on weekdays, through daylight-saving changes."""
    return "report sent"
