"""The sign-in cookie: one browser's session token, so a reload or a new tab stays signed in.

The cookie holds the random token that store.users.start_session made (the server keeps only
its hash). Streamlit reads cookies from the request that opened the page's connection
(st.context.cookies) but cannot set them, so a tiny component writes and clears the cookie with
`document.cookie`: `Path=/`, `SameSite=Strict`, `Secure` over https, and a Max-Age that ends
with the server-side session. Set from JavaScript, it cannot be HttpOnly; the hash in the
database, the expiry and the strict format check below are what protect it.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping

import streamlit as st

from store import db as storedb
from store import users

PREFIX = "prefloop_session_"

# The value reaches the page only as JSON data and is checked again here before it is written:
# a token is 43 URL-safe characters, a cookie name PREFIX + 12 hex digits.
COOKIE_JS = """
export default function ({ data }) {
  if (!data || !/^prefloop_session_[0-9a-f]{12}$/.test(data.name || "")) return;
  const attrs = "; Path=/; SameSite=Strict" + (location.protocol === "https:" ? "; Secure" : "");
  const current = () => {
    for (const part of document.cookie.split(";")) {
      const at = part.indexOf("=");
      if (at > 0 && part.slice(0, at).trim() === data.name) return part.slice(at + 1).trim();
    }
    return null;
  };
  if (typeof data.set === "string") {
    if (!/^[A-Za-z0-9_-]{43}$/.test(data.set)) return;
    const age = Math.max(0, Math.floor(Number(data.max_age) || 0));
    document.cookie = data.name + "=" + data.set + attrs + "; Max-Age=" + age;
  } else if (data.clear) {
    // only the token this page found dead: a newer sign-in from another tab keeps its cookie
    if (typeof data.only_if === "string" && current() !== data.only_if) return;
    document.cookie = data.name + "=" + attrs + "; Max-Age=0";
  }
}
"""
_cookie_component = st.components.v2.component("prefloop_session_cookie", js=COOKIE_JS)

WRITE = "session_cookie_write"  # (token, expiry as epoch seconds) signed in on this page
CLEAR = "session_cookie_clear"  # the dead token to clear ("" clears whatever is there)
READ = "session_cookie_read"  # the connection's cookie was looked at (it never changes)


def cookie_name(ws: storedb.Workspace) -> str:
    """The cookie's name for this workspace (two apps on one host keep their own sign-ins)."""
    digest = hashlib.sha256(str(ws.root.resolve()).encode()).hexdigest()
    return PREFIX + digest[:12]


def browser_cookies() -> Mapping[str, str]:
    """The cookies of the request that opened this page's connection."""
    return st.context.cookies


def take_browser_token(ws: storedb.Workspace) -> str | None:
    """The token in the cookie the page was opened with, the first time it is asked for in this
    browser session; a malformed cookie is never used and is cleared."""
    if st.session_state.get(READ):
        return None
    st.session_state[READ] = True
    value = browser_cookies().get(cookie_name(ws))
    if value is None:
        return None
    if users.is_session_token(value):
        return value
    st.session_state[CLEAR] = ""
    return None


def remember(token: str) -> None:
    """Keep a token that was just issued on this page in the browser until the session expires."""
    st.session_state[WRITE] = (token, time.time() + users.SESSION_HOURS * 3600)
    st.session_state.pop(CLEAR, None)


def forget(token: str | None) -> None:
    """Clear the browser's cookie if it still holds this (ended) token; no later run adopts the
    cookie the page was opened with."""
    st.session_state[READ] = True
    st.session_state.pop(WRITE, None)
    if token is None or users.is_session_token(token):
        st.session_state[CLEAR] = token or ""


def sync(ws: storedb.Workspace, token: str | None) -> None:
    """Draw the (invisible) cookie writer: write the signed-in token issued here, or clear an
    ended one. Drawn on every run, as one run's element may never reach the browser."""
    data: dict | None = None
    written = st.session_state.get(WRITE)
    if token and written and written[0] == token:
        data = {"set": token, "max_age": max(0, int(written[1] - time.time()))}
    elif CLEAR in st.session_state:
        clear = st.session_state[CLEAR]
        data = {"clear": True, "only_if": clear or None}
    if data is not None:
        data["name"] = cookie_name(ws)
        _cookie_component(key="session_cookie", data=data)
