"""Browser tests of the web console (Playwright on the system Chromium)."""
