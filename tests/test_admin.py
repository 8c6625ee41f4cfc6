"""Staff admin: the portal list at scale, the operations staff run, the dashboard, and masking.

Operations run against the Bitrix24 stand-in over real sockets (verify asks its app.info, a queued
renewal is then run and rotates a real single-use refresh token)."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

import pytest
import time_machine
from celery.signals import before_task_publish
from django.contrib import admin
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone
from django_celery_beat.models import IntervalSchedule, PeriodicTask

from config.celery import app as celery_app
from install.models import InboundKind, InboundRequest
from portals import masking, operations, selectors, verification
from portals.models import (
    PairState,
    Portal,
    PortalState,
    RenewalLog,
    RenewalOutcome,
    RenewalTrigger,
    TokenPair,
    WantedAction,
    WantedKind,
)
from portals.tasks import carry_out_task, queue_open_actions, renew_pair_task
from standin import payloads as bx
from tests.factories import InboundRequestFactory, PortalFactory, RenewalLogFactory

PORTALS = "/admin/portals/portal/"
DAY = timedelta(days=1)


def _sweep_task() -> PeriodicTask:
    """The beat entry the migration creates (re-created when a transactional test flushed it)."""
    every, _ = IntervalSchedule.objects.get_or_create(every=15, period=IntervalSchedule.MINUTES)
    task, _ = PeriodicTask.objects.get_or_create(
        task=selectors.SWEEP_TASK,
        defaults={"name": "Renew refresh tokens that near the end of their life", "interval": every},
    )
    return task


def _action(client, action: str, *portals: Portal, **extra: Any):
    data = {"action": action, "_selected_action": [p.pk for p in portals], "index": 0, **extra}
    return client.post(PORTALS, data, follow=True)


def _messages(response) -> list[str]:
    return [str(m) for m in response.context["messages"]]


# --- the list at scale ------------------------------------------------------------------------------


def _bulk_portals(start: int, count: int) -> None:
    """`count` portals with a realistic mix: background pairs of every age, employee pairs, failing
    and dead pairs, portals without a pair, uninstalled ones, and renewal log rows."""
    now = timezone.now()
    states = [PortalState.INSTALLED] * 8 + [PortalState.NEEDS_REINSTALL, PortalState.UNINSTALLED]
    Portal.objects.bulk_create(
        Portal(
            member_id=f"bulk{i:08d}",
            domain=f"p{i}.bitrix24.com",
            oauth_server="https://oauth.bitrix.info",
            app_status="LFDTPS"[i % 6],
            state=states[i % len(states)],
            application_token=f"apptoken{i:024d}",
            last_launch_at=now - timedelta(hours=i % 50),
        )
        for i in range(start, start + count)
    )
    ids = dict(Portal.objects.filter(member_id__startswith="bulk").values_list("member_id", "pk"))
    pairs, logs = [], []
    for i in range(start, start + count):
        pk = ids[f"bulk{i:08d}"]
        if i % 10 == 9:  # uninstalled: its tokens are gone
            continue
        if i % 7 != 3:
            pairs.append(
                TokenPair(
                    portal_id=pk,
                    user_id=1,
                    is_background=True,
                    access_token=f"access{i:026d}",
                    refresh_token=f"refresh{i:025d}",
                    access_expires_at=now + timedelta(minutes=(i % 120) - 30),
                    refresh_issued_at=now - (i % 30) * DAY,
                    state=PairState.DEAD if i % 23 == 0 else PairState.ACTIVE,
                    consecutive_failures=i % 4 if i % 5 == 0 else 0,
                )
            )
        if i % 3 == 0:
            pairs.append(
                TokenPair(
                    portal_id=pk,
                    user_id=7,
                    access_token=f"employee{i:024d}",
                    refresh_token=f"employeerefresh{i:017d}",
                    access_expires_at=now,
                    refresh_issued_at=now - DAY,
                )
            )
        for back in range(i % 3):
            logs.append(
                RenewalLog(
                    portal_id=pk,
                    user_id=1,
                    trigger=RenewalTrigger.BEAT,
                    outcome=[RenewalOutcome.RENEWED, RenewalOutcome.TRANSIENT][back % 2],
                    created_at=now - timedelta(hours=back * 7 + i % 5),
                )
            )
    TokenPair.objects.bulk_create(pairs)
    RenewalLog.objects.bulk_create(logs)


def _queries(client, url: str) -> tuple[int, str]:
    client.get(url)  # warm: the session and user rows, cached content types
    with CaptureQueriesContext(connection) as captured:
        response = client.get(url)
    assert response.status_code == 200, url
    return len(captured), response.content.decode()


@pytest.mark.django_db
def test_portal_list_costs_the_same_queries_at_10_and_1000_portals(admin_client):
    urls = [
        PORTALS,
        PORTALS + "?health=failing",
        PORTALS + "?health=due_soon&state__exact=installed",
        PORTALS + "?o=-8",  # ordered by days left (an annotation)
        PORTALS + "?q=bitrix24",
        reverse("admin_dashboard"),
    ]
    _bulk_portals(0, 10)
    at_10 = {url: _queries(admin_client, url) for url in urls}
    _bulk_portals(10, 990)
    assert Portal.objects.count() == 1000
    at_1000 = {url: _queries(admin_client, url) for url in urls}

    counts = {url: (at_10[url][0], at_1000[url][0]) for url in urls}
    print("queries (10 portals, 1000 portals):", counts)
    for url in urls:
        assert at_10[url][0] == at_1000[url][0], (url, counts[url])
    # The list really shows the rows (10, then a full page of 100) with their token health.
    assert at_10[PORTALS][1].count('name="_selected_action"') == 10
    assert at_1000[PORTALS][1].count('name="_selected_action"') == 100
    assert "1000 portals" in at_1000[PORTALS][1]
    assert at_10[PORTALS][1].count('class="field-refresh_days_left"') == 10


@pytest.mark.django_db
def test_list_columns_and_filters_show_token_health(admin_client, standin, settings):
    settings.BITRIX24_REFRESH_TOKEN_LIFETIME_DAYS = 28
    settings.BITRIX24_RENEW_MARGIN_DAYS = 7
    healthy = PortalFactory.for_standin(standin.add_portal(), pair__issued_days_ago=2)
    due = PortalFactory.for_standin(standin.add_portal(), pair__issued_days_ago=24)
    failing = PortalFactory.for_standin(
        standin.add_portal(),
        pair__issued_days_ago=27.5,
        pair__consecutive_failures=3,
        pair__last_error="Timeout",
    )
    dead = PortalFactory.for_standin(
        standin.add_portal(), state=PortalState.NEEDS_REINSTALL, pair__state=PairState.DEAD
    )
    bare = PortalFactory(domain="bare.bitrix24.com")
    RenewalLogFactory(portal=failing, outcome=RenewalOutcome.TRANSIENT, error="Timeout")

    def listed(query: str) -> set[str]:
        html = admin_client.get(PORTALS + query).content.decode()
        return set(re.findall(r'name="_selected_action" value="(\d+)"', html))

    assert listed("") == {str(p.pk) for p in (healthy, due, failing, dead, bare)}
    assert listed("?health=due_soon") == {str(due.pk), str(failing.pk)}
    assert listed("?health=lapsing") == {str(failing.pk)}
    assert listed("?health=failing") == {str(failing.pk), str(dead.pk)}
    assert listed("?health=no_pair") == {str(dead.pk), str(bare.pk)}
    assert listed("?state__exact=needs_reinstall") == {str(dead.pk)}
    assert listed(f"?q={failing.member_id}") == {str(failing.pk)}
    assert listed(f"?q={healthy.domain}") == {str(healthy.pk)}

    html = admin_client.get(PORTALS + f"?q={failing.member_id}").content.decode()
    row = html[html.index(failing.domain) :]
    assert "0.5" in row  # days left on the refresh token
    assert "27.5 d" in row  # its age
    assert "Failed, will retry" in row  # last renewal outcome
    assert 'title="Timeout">3<' in row  # consecutive failures, the error on hover


TOKEN_FIELDS = {"access_token", "refresh_token", "application_token"}


def test_no_token_field_is_searchable():
    for model, model_admin in admin.site._registry.items():
        for field in model_admin.search_fields:
            assert not TOKEN_FIELDS & set(field.lstrip("=^@").split("__")), (model, field)


@pytest.mark.django_db
def test_no_token_field_is_in_any_admin_form(rf, admin_user, standin):
    portal = PortalFactory.for_standin(standin.add_portal())
    pair = TokenPair.objects.get(portal=portal)
    request = rf.get("/admin/")
    request.user = admin_user
    for model, obj in ((Portal, portal), (TokenPair, pair)):
        model_admin = admin.site._registry[model]
        form = model_admin.get_form(request, obj)
        assert not TOKEN_FIELDS & set(form.base_fields), model
        for inline in model_admin.get_inline_instances(request, obj):
            inline_form = inline.get_formset(request, obj).form
            assert not TOKEN_FIELDS & set(inline_form.base_fields), inline


# --- operations: renew now -----------------------------------------------------------------------


@pytest.mark.django_db
def test_renew_now_queues_a_forced_staff_renewal_per_pair_after_commit(
    admin_client, standin, monkeypatch, django_capture_on_commit_callbacks
):
    portal = PortalFactory.for_standin(standin.add_portal(), users=(1, 7))
    issued = dict(TokenPair.objects.filter(portal=portal).values_list("user_id", "refresh_token"))
    assert len(issued) == 2
    bare = PortalFactory(domain="bare.bitrix24.com")
    sent: list[tuple] = []
    monkeypatch.setattr(carry_out_task, "apply_async", lambda args, **kw: sent.append(tuple(args)))

    with django_capture_on_commit_callbacks(execute=True):
        response = _action(admin_client, "renew_now", portal, bare)

    pairs = list(TokenPair.objects.filter(portal=portal).order_by("pk"))
    actions = list(WantedAction.objects.filter(portal=portal).order_by("pair_id"))
    assert [(a.pair_id, a.kind, a.trigger, a.force, a.done_at) for a in actions] == [
        (pair.pk, WantedKind.RENEW_PAIR, RenewalTrigger.STAFF, True, None) for pair in pairs
    ]
    assert sorted(sent) == [(a.pk,) for a in actions]
    text = " ".join(_messages(response))
    assert "Queued the renewal of 2 token pair(s) on 1 portal(s)" in text
    assert "Not queued: bare.bitrix24.com has no token pairs" in text

    # What the worker then does with each: a real refresh, logged as the staff's, and the action done.
    for args in sent:
        assert carry_out_task.apply(args=args).get() == "done"
    for pair in pairs:
        pair.refresh_from_db()
        assert pair.refresh_token != issued[pair.user_id]
    assert (
        RenewalLog.objects.filter(
            portal=portal, trigger=RenewalTrigger.STAFF, outcome=RenewalOutcome.RENEWED
        ).count()
        == 2
    )
    assert not WantedAction.objects.filter(portal=portal, done_at=None).exists()


@pytest.mark.django_db(transaction=True)
def test_queue_renewal_publishes_only_once_the_transaction_commits(standin):
    portal = PortalFactory.for_standin(standin.add_portal(), users=(1, 2, 3))
    published: list[list] = []

    def record(sender=None, body=None, **kwargs):
        if sender == "portals.tasks.carry_out_task":
            published.append(body[0])

    # Strongly referenced: Celery's publisher keeps the receivers list it saw first, and a weak
    # receiver dying later makes the signal swap that list, deafening later tests' receivers.
    before_task_publish.connect(record, weak=False)
    try:
        with transaction.atomic():
            assert operations.queue_renewal(portal=portal) == 3
            assert published == []
        actions = WantedAction.objects.filter(pk__in=[args[0] for args in published])
        assert sorted(a.pair_id for a in actions) == sorted(
            TokenPair.objects.filter(portal=portal).values_list("pk", flat=True)
        )
        uninstalled = PortalFactory.for_standin(standin.add_portal(), users=())
        with pytest.raises(operations.OperationRefused, match="no token pairs"):
            operations.queue_renewal(portal=uninstalled)
    finally:
        before_task_publish.disconnect(record)
        celery_app.control.purge()


@pytest.mark.django_db(transaction=True)
def test_renew_now_on_dead_pairs_says_what_is_wrong_instead_of_queuing(standin):
    portal = PortalFactory.for_standin(
        standin.add_portal(), pair__state=PairState.DEAD, pair__last_error="invalid_grant: token expired"
    )
    with pytest.raises(operations.OperationRefused) as refused:
        operations.queue_renewal(portal=portal)
    assert "invalid_grant" in str(refused.value) and "reinstall" in str(refused.value)
    assert not WantedAction.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_a_staff_renewal_whose_message_was_lost_is_queued_again_by_the_sweep(standin, monkeypatch):
    """The broker was away when staff clicked: the click answered, the work stayed recorded, and the
    sweep queues it once the grace for the original message has passed."""
    portal = PortalFactory.for_standin(standin.add_portal())

    def broker_down(*args, **kwargs):
        raise ConnectionError("broker unreachable")

    monkeypatch.setattr(carry_out_task, "apply_async", broker_down)
    assert operations.queue_renewal(portal=portal) == 1  # answered, nothing raised
    action = WantedAction.objects.get(portal=portal)
    assert action.done_at is None
    monkeypatch.undo()
    sent: list[tuple] = []
    monkeypatch.setattr(carry_out_task, "apply_async", lambda args, **kw: sent.append(tuple(args)))

    assert queue_open_actions() == 0  # a freshly recorded action is left to its own message at first
    with time_machine.travel(timezone.now() + timedelta(minutes=2)):
        assert queue_open_actions() == 1
        assert queue_open_actions() == 0  # now pending: not queued twice
    assert sent == [(action.pk,)]
    assert carry_out_task.apply(args=(action.pk,)).get() == "done"
    action.refresh_from_db()
    assert action.done_at is not None


@pytest.mark.django_db(transaction=True)
def test_renew_button_on_the_portal_page(
    admin_client, standin, monkeypatch, django_capture_on_commit_callbacks
):
    portal = PortalFactory.for_standin(standin.add_portal())
    sent: list[tuple] = []
    monkeypatch.setattr(carry_out_task, "apply_async", lambda args, **kw: sent.append(tuple(args)))
    url = reverse("admin:portals_portal_operate", args=(portal.pk, "renew"))

    assert admin_client.get(url).status_code == 405  # a GET never acts
    with django_capture_on_commit_callbacks(execute=True):
        response = admin_client.post(url, follow=True)

    assert response.redirect_chain[-1][0] == reverse("admin:portals_portal_change", args=(portal.pk,))
    assert "Queued the renewal of 1 token pair(s)" in " ".join(_messages(response))
    assert len(sent) == 1
    assert (
        admin_client.post(reverse("admin:portals_portal_operate", args=(portal.pk, "nope"))).status_code
        == 403
    )


# --- operations: verify with app.info -----------------------------------------------------------------


@pytest.mark.django_db
def test_verify_asks_app_info_with_the_portals_own_token_and_stores_the_status(admin_client, standin):
    fake = standin.add_portal()
    portal = PortalFactory.for_standin(fake)
    fake.status = "P"  # the customer paid since we last heard
    before = standin.stats["app_info"]

    response = _action(admin_client, "verify_with_app_info", portal)

    assert standin.stats["app_info"] == before + 1
    portal.refresh_from_db()
    assert portal.app_status == "P"
    assert f"{portal.domain}: verified with app.info: app installed, status Paid" in " ".join(
        _messages(response)
    )


@pytest.mark.django_db
def test_verify_renews_an_expired_access_token_first(standin):
    portal = PortalFactory.for_standin(standin.add_portal())
    issued = TokenPair.objects.get(portal=portal).refresh_token
    # An hour and a minute later the access token has expired, for us and for Bitrix24.
    with time_machine.travel(timezone.now() + timedelta(hours=1, minutes=1)):
        info = operations.verify_portal(portal=portal)
    assert info.member_id == portal.member_id
    assert TokenPair.objects.get(portal=portal).refresh_token != issued


@pytest.mark.django_db
def test_verify_explains_why_it_cannot(admin_client, standin):
    dead = PortalFactory.for_standin(standin.add_portal(), pair__state=PairState.DEAD)
    gone = PortalFactory.for_standin(standin.add_portal(), state=PortalState.UNINSTALLED, users=())
    with pytest.raises(operations.OperationRefused, match="no usable background token pair"):
        operations.verify_portal(portal=dead)
    with pytest.raises(operations.OperationRefused, match="uninstalled"):
        operations.verify_portal(portal=gone)

    fake = standin.add_portal()
    uninstalled_on_bitrix = PortalFactory.for_standin(fake)
    fake.uninstall()  # its tokens die on Bitrix24's side
    with pytest.raises(operations.OperationRefused, match=r"app\.info refused the portal's token"):
        operations.verify_portal(portal=uninstalled_on_bitrix)

    standin.oauth_mode = "down"
    healthy = PortalFactory.for_standin(standin.add_portal())
    with pytest.raises(verification.UpstreamUnavailable):
        operations.verify_portal(portal=healthy)
    response = _action(admin_client, "verify_with_app_info", dead, healthy)
    text = " ".join(_messages(response))
    assert f"{dead.domain}: not verified: " in text and "needs a reinstall" in text
    assert f"{healthy.domain}: not verified: cannot reach the OAuth server" in text


# --- operations: mark as needing reinstall -----------------------------------------------------------


@pytest.mark.django_db
def test_mark_needs_reinstall_from_the_list_and_from_the_portal_page(admin_client, standin):
    first = PortalFactory.for_standin(standin.add_portal())
    second = PortalFactory.for_standin(standin.add_portal())
    gone = PortalFactory.for_standin(standin.add_portal(), state=PortalState.UNINSTALLED, users=())

    response = _action(admin_client, "mark_needs_reinstall", first, gone)
    first.refresh_from_db()
    assert first.state == PortalState.NEEDS_REINSTALL
    assert first.state_reason == "marked by staff (admin)"
    text = " ".join(_messages(response))
    assert f"Marked as needing a reinstall: {first.domain}." in text
    assert f"{gone.domain} is uninstalled" in text
    assert Portal.objects.get(pk=gone.pk).state == PortalState.UNINSTALLED

    url = reverse("admin:portals_portal_operate", args=(second.pk, "reinstall"))
    admin_client.post(url, {"reason": "customer revoked the app's rights"})
    second.refresh_from_db()
    assert (second.state, second.state_reason) == (
        PortalState.NEEDS_REINSTALL,
        "customer revoked the app's rights",
    )
    assert TokenPair.objects.filter(portal=second).exists()  # kept: a reinstall or launch revives it
    with pytest.raises(operations.OperationRefused, match="reason"):
        operations.mark_needs_reinstall(portal=second, reason="  ")


# --- operations: purge ----------------------------------------------------------------------------


@pytest.mark.django_db
def test_purge_asks_first_then_deletes_an_uninstalled_portals_data(admin_client, standin):
    gone = PortalFactory.for_standin(standin.add_portal(), state=PortalState.UNINSTALLED)
    alive = PortalFactory.for_standin(standin.add_portal())
    for portal in (gone, alive):
        RenewalLogFactory(portal=portal, outcome=RenewalOutcome.RENEWED)
        InboundRequestFactory(kind=InboundKind.EVENT, event="ONAPPINSTALL", member_id=portal.member_id)

    confirm = _action(admin_client, "purge_data", gone, alive)
    html = confirm.content.decode()
    assert "Purge the data of uninstalled portals?" in html
    assert gone.domain in html and "Not uninstalled, so they will not be purged" in html
    assert TokenPair.objects.filter(portal=gone).exists()  # nothing yet

    response = _action(admin_client, "purge_data", gone, alive, confirmed="yes")

    text = " ".join(_messages(response))
    assert f"Purged the tokens, renewal log and inbound requests of: {gone.domain}." in text
    assert f"Not purged: {alive.domain}: only an uninstalled portal's data can be purged" in text
    assert not TokenPair.objects.filter(portal=gone).exists()
    assert not RenewalLog.objects.filter(portal=gone).exists()
    assert not InboundRequest.objects.filter(member_id=gone.member_id).exists()
    assert Portal.objects.filter(pk=gone.pk).exists()  # the row stays, as the memory of the install
    assert TokenPair.objects.filter(portal=alive).exists()
    assert RenewalLog.objects.filter(portal=alive).exists()
    assert InboundRequest.objects.filter(member_id=alive.member_id).exists()


@pytest.mark.django_db
def test_purge_button_confirms_on_its_own_page(admin_client, standin):
    gone = PortalFactory.for_standin(standin.add_portal(), state=PortalState.UNINSTALLED)
    url = reverse("admin:portals_portal_operate", args=(gone.pk, "purge"))
    page = admin_client.get(url)
    assert page.status_code == 200 and "Yes, purge their data" in page.content.decode()
    assert TokenPair.objects.filter(portal=gone).exists()
    response = admin_client.post(url, {"confirmed": "yes"}, follow=True)
    assert f"Purged the tokens, renewal log and inbound requests of: {gone.domain}." in " ".join(
        _messages(response)
    )
    assert not TokenPair.objects.filter(portal=gone).exists()


@pytest.mark.django_db
def test_operations_need_a_staff_user_with_the_right(client, staff_user, standin):
    portal = PortalFactory.for_standin(standin.add_portal())
    url = reverse("admin:portals_portal_operate", args=(portal.pk, "reinstall"))
    assert client.post(url).status_code == 302  # to the login page
    viewer = staff_user
    from django.contrib.auth.models import Permission

    viewer.user_permissions.add(Permission.objects.get(codename="view_portal"))
    client.force_login(viewer)
    assert client.get(PORTALS).status_code == 200
    assert client.post(url).status_code == 403
    assert Portal.objects.get(pk=portal.pk).state == PortalState.INSTALLED
    assert client.get(reverse("admin_dashboard")).status_code == 200


# --- dashboard ------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_dashboard_counts_chart_activity_and_next_sweep(admin_client, standin, settings):
    settings.BITRIX24_REFRESH_TOKEN_LIFETIME_DAYS = 28
    settings.BITRIX24_RENEW_MARGIN_DAYS = 7
    for days in (0.5, 0.5, 1.5, 10.5, 24.5, 29):
        PortalFactory.for_standin(standin.add_portal(), pair__issued_days_ago=days)
    PortalFactory.for_standin(
        standin.add_portal(), state=PortalState.NEEDS_REINSTALL, pair__state=PairState.DEAD
    )
    PortalFactory.for_standin(standin.add_portal(), state=PortalState.UNINSTALLED, users=())
    portal = Portal.objects.first()
    assert portal is not None
    now = timezone.now()
    for outcome, hours in [
        (RenewalOutcome.RENEWED, 1),
        (RenewalOutcome.RENEWED, 30),
        (RenewalOutcome.REFUSED, 2),
    ]:
        RenewalLogFactory(portal=portal, outcome=outcome, created_at=now - timedelta(hours=hours))
    task = _sweep_task()
    task.last_run_at = now - timedelta(minutes=5)
    task.save()

    response = admin_client.get(reverse("admin_dashboard"))

    assert response.status_code == 200
    html = response.content.decode()
    assert "Installations (8)" in html
    states = {s["state"]: s["count"] for s in response.context["states"]}
    assert states == {"installed": 6, "pending": 0, "needs_reinstall": 1, "uninstalled": 1}
    # The chart: one bar per day of life left plus "lapsed"; the active background pairs are in it.
    bars = response.context["chart"]["bars"]
    assert '<svg class="dash-chart"' in html and html.count("<rect") >= len(bars)
    by_label = {bar.label: bar.count for bar in bars}
    assert by_label["lapsed"] == 1  # issued 29 days ago
    assert by_label["3"] == 1  # issued 24.5 days ago: 3.5 days left
    assert by_label["27"] == 2 and by_label["26"] == 1 and by_label["17"] == 1
    assert sum(by_label.values()) == 6  # the dead pair and the uninstalled portal are not in it
    assert "2 renewed, 1 failed" in html
    sweep = response.context["schedules"][0]
    assert sweep.next_run_at == task.last_run_at + timedelta(minutes=15)
    assert re.search(r"in (9|10).minutes", html)  # next sweep: last run + 15 minutes
    health = {card["key"]: card["count"] for card in response.context["health"]}
    assert health == {
        "due_soon": 2,
        "lapsing": 1,
        "failing": 1,
        "no_usable_pair": 1,
        "lost": 0,
        "clock_skew": 0,
    }
    # Linked from the admin index.
    assert reverse("admin_dashboard") in admin_client.get("/admin/").content.decode()


@pytest.mark.django_db
def test_dashboard_says_when_beat_never_ran_or_is_disabled(admin_client):
    task = _sweep_task()
    task.last_run_at = None
    task.save()
    assert "beat has not run it yet" in admin_client.get(reverse("admin_dashboard")).content.decode()
    task.enabled = False
    task.save()
    assert "disabled" in admin_client.get(reverse("admin_dashboard")).content.decode()
    hourly, _ = IntervalSchedule.objects.get_or_create(every=1, period=IntervalSchedule.HOURS)
    PeriodicTask.objects.create(
        name="second sweep",
        task=selectors.SWEEP_TASK,
        interval=hourly,
        last_run_at=timezone.now() - timedelta(hours=3),
    )
    assert "overdue: is celery beat running?" in admin_client.get(reverse("admin_dashboard")).content.decode()
    PeriodicTask.objects.filter(task=selectors.SWEEP_TASK).delete()
    assert (
        "refresh tokens are only renewed on demand"
        in admin_client.get(reverse("admin_dashboard")).content.decode()
    )


# --- masking: no token in full on any admin page ------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_no_admin_page_shows_a_token_in_full(backend, b24, standin, admin_client):
    installer = b24.issue_tokens(1, admin=True)
    assert backend.install_event(b24, installer).status_code == 200
    employee = b24.issue_tokens(7, admin=False)
    assert backend.launch(b24, employee).status_code == 200
    portal = Portal.objects.get(member_id=b24.member_id)
    background = TokenPair.objects.get(portal=portal, user_id=1)
    renewal_pair = TokenPair.objects.get(portal=portal, user_id=7)
    old_employee_refresh = renewal_pair.refresh_token
    renew_pair_task.apply(args=(renewal_pair.pk, RenewalTrigger.STAFF, True))
    renewal_pair.refresh_from_db()
    gone = standin.add_portal()
    assert backend.install_event(gone).status_code == 200
    gone.uninstall()
    assert backend.post("/events/", data=bx.onappuninstall(gone)).status_code == 200
    gone_row = Portal.objects.get(member_id=gone.member_id)

    secrets = [
        installer["access_token"],
        installer["refresh_token"],
        employee["access_token"],
        old_employee_refresh,
        renewal_pair.access_token,
        renewal_pair.refresh_token,
        b24.application_token,
        gone.application_token,
    ]
    log = RenewalLog.objects.filter(portal=portal).first()
    inbound = InboundRequest.objects.filter(member_id=b24.member_id).first()
    assert log is not None and inbound is not None
    pages = [
        PORTALS,
        PORTALS + "?health=failing",
        reverse("admin:portals_portal_change", args=(portal.pk,)),
        reverse("admin:portals_portal_change", args=(gone_row.pk,)),
        reverse("admin:portals_portal_operate", args=(gone_row.pk, "purge")),
        reverse("admin:portals_tokenpair_changelist"),
        reverse("admin:portals_tokenpair_change", args=(background.pk,)),
        reverse("admin:portals_tokenpair_change", args=(renewal_pair.pk,)),
        reverse("admin:portals_renewallog_changelist"),
        reverse("admin:portals_renewallog_changelist") + f"?portal__id__exact={portal.pk}",
        reverse("admin:portals_tokenpair_changelist") + f"?portal__id__exact={portal.pk}",
        reverse("admin:portals_renewallog_change", args=(log.pk,)),
        reverse("admin:install_inboundrequest_changelist"),
        reverse("admin:install_inboundrequest_changelist") + f"?member_id={b24.member_id}",
        reverse("admin:install_inboundrequest_change", args=(inbound.pk,)),
        reverse("admin_dashboard"),
        "/admin/",
    ]
    for page in pages:
        response = admin_client.get(page)
        assert response.status_code == 200, page
        html = response.content.decode()
        for secret in secrets:
            assert secret not in html, (page, masking.fingerprint(secret))
            assert secret[:12] not in html, (page, masking.fingerprint(secret))  # not even a long prefix
    detail = admin_client.get(reverse("admin:portals_portal_change", args=(portal.pk,))).content.decode()
    detail = detail.replace("&hellip;", "…")
    for shown in (background.access_token, background.refresh_token, b24.application_token):
        assert masking.mask(shown) in detail
    # Read-only: no input of any kind carries a token field.
    for name in ("access_token", "refresh_token", "application_token"):
        assert f'name="{name}"' not in detail
        assert f'name="token_pairs-0-{name}"' not in detail
    # The inbound log filtered for this portal shows only its requests, linked back to the portal.
    inbound_page = admin_client.get(
        reverse("admin:install_inboundrequest_changelist") + f"?member_id={b24.member_id}"
    ).content.decode()
    assert reverse("admin:portals_portal_change", args=(portal.pk,)) in inbound_page
    assert gone.member_id not in inbound_page


@pytest.mark.django_db
def test_staff_set_a_portals_rest_limits_and_nothing_else(admin_client, standin):
    portal = PortalFactory.for_standin(standin.add_portal())
    url = f"{PORTALS}{portal.pk}/change/"
    page = admin_client.get(url).content.decode()
    assert 'name="rate_limit"' in page and 'name="rate_burst"' in page
    assert 'name="domain"' not in page and 'name="state"' not in page
    # It reads as a page about the installation, its one button as what it saves.
    assert f"<h1>Portal {portal.domain}</h1>" in page and "Change portal" not in page
    assert 'value="Save REST limits"' in page and 'value="Save"' not in page

    # The read-only inlines still carry their formsets' management fields, as a browser would send them.
    management = dict(
        re.findall(r'name="([\w-]+-(?:TOTAL|INITIAL|MIN_NUM|MAX_NUM)_FORMS)"[^>]*value="(\d*)"', page)
    )
    assert management
    response = admin_client.post(
        url,
        {
            **management,
            "rate_limit": "5",
            "rate_burst": "250",
            "domain": "evil.example.com",
            "state": "uninstalled",
        },
    )
    assert response.status_code == 302
    portal.refresh_from_db()
    assert (portal.rate_limit, portal.rate_burst) == (5.0, 250)
    assert portal.domain != "evil.example.com" and portal.state == PortalState.INSTALLED

    response = admin_client.post(url, {**management, "rate_limit": "-1", "rate_burst": "0"})
    assert response.status_code == 200  # the form again, with its errors
    portal.refresh_from_db()
    assert (portal.rate_limit, portal.rate_burst) == (5.0, 250)


@pytest.mark.django_db
def test_the_index_lists_the_products_sections_first(admin_client):
    page = admin_client.get(reverse("admin:index")).content.decode()
    order = [page.find(f'class="app-{label} module') for label in ("portals", "events", "install", "auth")]
    assert all(index > 0 for index in order), order
    assert order == sorted(order)  # portals, events, install, then the frameworks' (users and groups)


@pytest.mark.django_db
def test_an_empty_list_says_so_and_how_rows_come(admin_client, standin):
    page = admin_client.get(PORTALS).content.decode()
    assert "No portals yet. A portal appears when Bitrix24 installs the app on it" in page
    users = admin_client.get(reverse("admin:auth_group_changelist")).content.decode()
    assert "No groups yet." in users  # third-party lists too, without a hint of ours
    PortalFactory.for_standin(standin.add_portal())
    searched = admin_client.get(PORTALS + "?q=nowhere.example").content.decode()
    assert "No portals match this search or filter (1 in all)." in searched


@pytest.mark.django_db
def test_the_portal_pages_empty_tables_say_so(admin_client, standin):
    portal = PortalFactory.for_standin(standin.add_portal())
    url = f"{PORTALS}{portal.pk}/change/"
    page = admin_client.get(url).content.decode()
    assert 'id="token_pairs-group"' in page and "<table" in page  # the pair, in its table
    assert "None yet. Refresh tokens are renewed before they lapse" in page  # no renewal yet
    portal.token_pairs.all().delete()
    page = admin_client.get(url).content.decode()
    assert "None yet. The install stores the first pair" in page
    # The page still saves its REST limits with its tables empty: their management fields are sent as a
    # browser would.
    management = dict(
        re.findall(r'name="([\w-]+-(?:TOTAL|INITIAL|MIN_NUM|MAX_NUM)_FORMS)"[^>]*value="(\d*)"', page)
    )
    assert len(management) == 8, management
    response = admin_client.post(url, {**management, "rate_limit": "3", "rate_burst": "90"})
    assert response.status_code == 302
    portal.refresh_from_db()
    assert (portal.rate_limit, portal.rate_burst) == (3.0, 90)
