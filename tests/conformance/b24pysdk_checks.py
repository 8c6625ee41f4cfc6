"""Run by tests/test_conformance.py in the official Python SDK's own venv (var/conformance/b24pysdk): the SDK,
unchanged, against a stand-in portal. Over HTTPS (the stand-in's local authority trusted through
REQUESTS_CA_BUNDLE) only the OAuth server's hard-coded URLs are pointed at the stand-in; a plain-HTTP stand-in
needs the REST base URL's scheme changed too. Prints one JSON object."""

import importlib
import json
import sys

from b24pysdk import BitrixApp, BitrixToken, BitrixWebhook, Client

config = json.loads(sys.argv[1])
if not config["oauth"].startswith("https://"):
    # A plain-HTTP stand-in: the SDK's REST base is https://{domain}/rest, hard-coded.
    caller = importlib.import_module("b24pysdk.api.callers.call_method")._MethodCaller
    caller._base_url = property(lambda self: f"http://{self._domain}/rest")
requester = importlib.import_module("b24pysdk.api.requesters.bitrix_oauth_requester").BitrixOAuthRequester
requester._OAUTH_TOKEN_URL = config["oauth"] + "/oauth/token/"
requester._APP_INFO_URL = config["oauth"] + "/rest/app.info/"

out = {}
hook = BitrixWebhook(domain=config["domain"], webhook_token=config["webhook"])
client = Client(hook)
new_id = client.crm.deal.add(fields={"TITLE": "Forty chairs", "OPPORTUNITY": 100}).result
deal = client.crm.deal.get(bitrix_id=int(new_id)).result
out["deal"] = [deal["TITLE"], deal["OPPORTUNITY"], deal["STAGE_ID"], deal["CLOSED"]]
for number in range(60):
    hook.call_method("crm.deal.add", {"fields": {"TITLE": f"Deal {number}"}})
out["list"] = len(hook.call_list("crm.deal.list", {"select": ["ID"]})["result"])
out["fast"] = len(list(hook.call_list_fast("crm.deal.list", {"select": ["ID", "TITLE"]})["result"]))
listed = hook.call_list("crm.deal.list", {"filter": {"%TITLE": "CHAIRS"}, "select": ["TITLE"]})["result"]
out["filtered"] = [row["TITLE"] for row in listed]
batch = hook.call_batch({"deal": ("crm.deal.get", {"id": new_id}), "me": ("user.current", {})})
out["batch"] = sorted(batch["result"]["result"])
try:
    hook.call_method("crm.deal.get", {"id": 99999})
    out["missing"] = "no error"
except Exception as exc:  # which class the SDK raises for Bitrix24's empty-code "Not found"
    out["missing"] = f"{type(exc).__name__}: {exc}"
out["me"] = client.user.current().result["ID"]
out["fields"] = client.crm.deal.fields().result["ID"]["type"]

# OAuth: an access token the portal says has expired; the SDK refreshes it through the OAuth server.
app = BitrixApp(client_id=config["client_id"], client_secret=config["client_secret"])
token = BitrixToken(
    domain=config["domain"], auth_token=config["access"], refresh_token=config["refresh"], bitrix_app=app
)
out["oauth_profile"] = token.call_method("profile")["result"]["ID"]
out["refreshed"] = token.auth_token != config["access"] and token.refresh_token != config["refresh"]
out["new_refresh"] = token.refresh_token
# The OAuth server's app.info, parsed by the SDK's own response class (its `expires` is an ISO date).
info = token.get_app_info().result
out["app_info"] = [info.client_id, info.install.member_id, info.expires.isoformat(), info.user_id]
print(json.dumps(out))
