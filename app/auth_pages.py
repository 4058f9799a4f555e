"""Sign-in (and first-admin set-up) page, the signed-in user, and the admin's accounts page."""

from __future__ import annotations

import secrets

import streamlit as st

from app import actions, session_cookie
from labeling.safe_text import plain
from store import db as storedb
from store.access import ROLES, User
from store.errors import PrefloopError
from store.users import FAILURE_WINDOW, MAX_NAME, MAX_PASSWORD

TOKEN = "session_token"
CLIENT = "client_id"
KEEP = "(keep)"


def signed_in_user(ws: storedb.Workspace) -> User | None:
    """The user of this browser session (signed in on this page, or by the browser's sign-in
    cookie on a reload or a new tab), or None (the session ended or expired)."""
    token = st.session_state.get(TOKEN)
    if token is None:
        token = session_cookie.take_browser_token(ws)
        if token is not None:
            st.session_state[TOKEN] = token
    user = actions.current_user(ws, token)
    if user is None and token:
        st.session_state.pop(TOKEN, None)
        session_cookie.forget(token)  # signed out elsewhere, expired, role or password changed
        st.session_state["login_note"] = "Your session ended; sign in again."
    return user


def _signed_in(token: str) -> None:
    st.session_state[TOKEN] = token
    session_cookie.remember(token)


def _client() -> str:
    """Who signs in, for the slow-down: the connection's address, or (on localhost and behind
    a proxy, where Streamlit sees none) this browser session."""
    address = st.context.ip_address
    if isinstance(address, str) and address:
        return address
    return st.session_state.setdefault(CLIENT, "session:" + secrets.token_hex(8))


def _sign_in(ws: storedb.Workspace) -> None:
    name = st.session_state.get("login_name", "")
    password = st.session_state.get("login_password", "")
    st.session_state["login_password"] = ""
    try:
        _, token = actions.sign_in(ws, name, password, _client())
    except PrefloopError as exc:
        st.session_state["login_error"] = str(exc)
        return
    _signed_in(token)


def _first_admin(ws: storedb.Workspace) -> None:
    name = st.session_state.get("setup_name", "")
    password = st.session_state.get("setup_password", "")
    repeat = st.session_state.get("setup_repeat", "")
    st.session_state["setup_password"] = st.session_state["setup_repeat"] = ""
    if password != repeat:
        st.session_state["login_error"] = "the two passwords differ"
        return
    try:
        _signed_in(actions.create_first_admin(ws, name, password))
    except PrefloopError as exc:
        st.session_state["login_error"] = str(exc)


def login_page(ws: storedb.Workspace) -> None:
    """Ask for name and password (or, in a workspace without accounts, for a first admin)."""
    st.title("prefloop")
    session_cookie.sync(ws, None)  # clears an ended session's cookie
    note = st.session_state.pop("login_note", None)
    if note:
        st.info(plain(note))
    error = st.session_state.pop("login_error", None)
    if error:
        st.error(plain(error))  # may quote the typed name
    if actions.needs_first_admin(ws):
        st.subheader("Create the first admin account")
        st.caption(
            "This workspace has no accounts yet. The first one is an admin, who adds the team "
            "on the Admin page (or with `prefloop users add NAME --role ROLE`)."
        )
        with st.form("setup_form"):
            st.text_input("Name", key="setup_name")
            st.text_input("Password (8+ characters)", type="password", key="setup_password")
            st.text_input("Repeat password", type="password", key="setup_repeat")
            st.form_submit_button(
                "Create admin", key="setup_submit", on_click=_first_admin, args=(ws,)
            )
        return
    st.subheader("Sign in")
    with st.form("login_form"):
        st.text_input("Name", key="login_name", max_chars=MAX_NAME)
        st.text_input("Password", type="password", key="login_password", max_chars=MAX_PASSWORD)
        st.form_submit_button("Sign in", key="sign_in", on_click=_sign_in, args=(ws,))
    st.caption("No account? Ask your project's admin.")


def keep_signed_in(ws: storedb.Workspace) -> None:
    """Keep this page's sign-in in the browser's cookie (drawn on every signed-in run)."""
    session_cookie.sync(ws, st.session_state.get(TOKEN))


def sign_out(ws: storedb.Workspace) -> None:
    """End this browser's session: on the server, and its sign-in cookie (every tab)."""
    token = st.session_state.pop(TOKEN, None)
    actions.sign_out(ws, token)
    for key in list(st.session_state):
        del st.session_state[key]
    session_cookie.forget(token)
    st.session_state["login_note"] = "Signed out."


def _add_account(ws: storedb.Workspace, user: User) -> None:
    try:
        added = actions.add_account(
            ws,
            user,
            st.session_state.get("new_name", ""),
            st.session_state.get("new_role", ROLES[0]),
            st.session_state.get("new_password", ""),
        )
    except PrefloopError as exc:
        st.session_state["admin_error"] = str(exc)
        return
    st.session_state["new_password"] = ""
    st.session_state["admin_note"] = f"Added {added.name} ({added.role})."


def _change_account(ws: storedb.Workspace, user: User) -> None:
    name = st.session_state.get("edit_name")
    role = st.session_state.get("edit_role", KEEP)
    active = st.session_state.get("edit_active", KEEP)
    if not name:
        return
    try:
        actions.change_account(
            ws,
            user,
            name,
            role=None if role == KEEP else role,
            password=st.session_state.get("edit_password") or None,
            active=None if active == KEEP else active == "enabled",
        )
    except PrefloopError as exc:
        st.session_state["admin_error"] = str(exc)
        return
    st.session_state["edit_password"] = ""
    st.session_state["admin_note"] = f"Updated {name}."


def admin_page(ws: storedb.Workspace, user: User) -> None:
    """Accounts and roles."""
    st.title("Accounts")
    accounts = actions.list_accounts(ws, user)
    for prefix, show in (("admin_note", st.success), ("admin_error", st.error)):
        msg = st.session_state.pop(prefix, None)
        if msg:
            show(plain(msg))
    st.dataframe(accounts, hide_index=True, width="stretch")
    c1, c2 = st.columns(2)
    with c1, st.form("add_account"):
        st.subheader("Add an account")
        st.text_input("Name", key="new_name")
        st.selectbox("Role", ROLES, key="new_role")
        st.text_input("Password (8+ characters)", type="password", key="new_password")
        st.form_submit_button(
            "Add", key="add_account_submit", on_click=_add_account, args=(ws, user)
        )
    with c2, st.form("edit_account"):
        st.subheader("Change an account")
        names = list(accounts["name"])
        st.selectbox("Account", names, key="edit_name")
        st.selectbox("Role", [KEEP, *ROLES], key="edit_role")
        st.text_input("New password (empty: keep)", type="password", key="edit_password")
        st.selectbox("Account state", [KEEP, "enabled", "disabled"], key="edit_active")
        st.form_submit_button(
            "Save", key="edit_account_submit", on_click=_change_account, args=(ws, user)
        )
    st.caption(
        "Roles: annotators label; researchers also see the research pages, start jobs, curate "
        "and export; admins also manage accounts. Changing a role or password ends that "
        "account's sessions."
    )
    st.subheader(f"Failed sign-ins (last {FAILURE_WINDOW.seconds // 60} minutes)")
    failed = actions.failed_sign_ins(ws, user)
    if failed.empty:
        st.caption("None.")
    else:
        st.dataframe(failed, hide_index=True, width="stretch")
        st.caption(
            "Per account name and client (address, or browser session on localhost and behind "
            "a proxy). Many names from one client, or many clients at once, is someone guessing."
        )
