"""A portal's state has one door (portals.lifecycle): its named transitions check where they start from,
and nothing else can change the state."""

from __future__ import annotations

import pytest
from django.utils import timezone

from portals import lifecycle
from portals.models import Portal, PortalState, ReinstallCause, StateOutsideLifecycle
from tests.factories import PortalFactory

pytestmark = pytest.mark.django_db


def test_the_state_changes_only_through_a_transition():
    portal = PortalFactory(state=PortalState.INSTALLED)
    with pytest.raises(StateOutsideLifecycle):
        portal.state = PortalState.UNINSTALLED
    with pytest.raises(StateOutsideLifecycle):
        Portal.objects.filter(pk=portal.pk).update(state=PortalState.UNINSTALLED)
    with pytest.raises(StateOutsideLifecycle):
        Portal.objects.bulk_update([portal], ["state"])
    portal.refresh_from_db()
    assert portal.state == PortalState.INSTALLED
    # Setting it to what it is, reading rows and making new ones are not changes.
    portal.state = PortalState.INSTALLED
    assert Portal.objects.get(pk=portal.pk).state == PortalState.INSTALLED
    assert PortalFactory(state=PortalState.PENDING).state == PortalState.PENDING


def test_a_reload_brings_the_state_another_process_wrote():
    portal = PortalFactory(state=PortalState.INSTALLED)
    other = Portal.objects.get(pk=portal.pk)
    lifecycle.marked_by_staff(other, reason="asked by the customer")
    other.save()
    portal.refresh_from_db()
    assert (portal.state, portal.reinstall_cause) == (PortalState.NEEDS_REINSTALL, ReinstallCause.STAFF)


@pytest.mark.parametrize(
    ("transition", "start"),
    [
        (lambda p: lifecycle.approved_by_staff(p), PortalState.INSTALLED),
        (lambda p: lifecycle.marked_by_staff(p, reason="why"), PortalState.UNINSTALLED),
        (lambda p: lifecycle.first_seen_through_a_user(p), PortalState.INSTALLED),
        (lambda p: lifecycle.background_awaits_proof(p), PortalState.INSTALLED),
        (lambda p: lifecycle.installed_by_admin(p, now=timezone.now()), PortalState.INSTALLED),
    ],
)
def test_a_transition_refuses_a_state_it_does_not_start_from(transition, start):
    portal = PortalFactory(state=start)
    with pytest.raises(lifecycle.WrongState):
        transition(portal)
    assert Portal.objects.get(pk=portal.pk).state == start


def test_staffs_mark_is_not_cleared_by_a_new_background_pair_but_by_an_admins_reinstall():
    portal = PortalFactory(state=PortalState.INSTALLED)
    lifecycle.marked_by_staff(portal, reason="the customer asked")
    with pytest.raises(lifecycle.WrongState):
        lifecycle.background_awaits_proof(portal)
    portal.save()
    assert lifecycle.background_proven(portal.pk) == 0  # a working pair does not clear staff's mark
    assert lifecycle.background_lost(portal.pk, reason="lost") == 0  # nor does a lost one overwrite it
    lifecycle.after_verified_visit(portal, now=timezone.now(), new_background=True)
    assert (portal.state, portal.reinstall_cause) == (PortalState.INSTALLED, "")


def test_the_background_pairs_fate_moves_the_portal_and_its_proof_brings_it_back():
    portal = PortalFactory(state=PortalState.INSTALLED)
    assert lifecycle.background_refused(portal.pk, code="invalid_grant") == 1
    portal.refresh_from_db()
    assert (portal.state, portal.reinstall_cause) == (PortalState.NEEDS_REINSTALL, ReinstallCause.TOKENS)
    lifecycle.after_verified_visit(portal, now=timezone.now(), new_background=True)
    assert (portal.state, portal.reinstall_cause) == (PortalState.NEEDS_REINSTALL, ReinstallCause.CONFIRMING)
    portal.save()
    assert lifecycle.background_proven(portal.pk) == 1
    portal.refresh_from_db()
    assert portal.state == PortalState.INSTALLED
