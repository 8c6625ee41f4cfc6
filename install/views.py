"""The URLs Bitrix24 posts to. Bitrix24 cannot send a CSRF token: these three are exempt, and
nothing else in the project is."""

from django.http import HttpRequest, HttpResponse
from django.views.decorators.csrf import csrf_exempt

from . import handlers
from .inbound import receive
from .models import InboundKind


@csrf_exempt
def install(request: HttpRequest) -> HttpResponse:
    return receive(request, kind=InboundKind.INSTALL, handler=handlers.install_frame)


@csrf_exempt
def app(request: HttpRequest) -> HttpResponse:
    return receive(request, kind=InboundKind.LAUNCH, handler=handlers.launch)


@csrf_exempt
def events(request: HttpRequest) -> HttpResponse:
    return receive(request, kind=InboundKind.EVENT, handler=handlers.event)
