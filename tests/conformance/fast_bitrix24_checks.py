"""Run by tests/test_conformance.py in fast_bitrix24's own venv (var/conformance/fast-bitrix24): the library,
unchanged, against a stand-in portal's inbound webhook (its default mode). Prints one JSON object."""

import json
import sys

from fast_bitrix24 import Bitrix

config = json.loads(sys.argv[1])
bitrix = Bitrix(config["webhook_url"], verbose=False)
out = {}
ids = bitrix.call(
    "crm.deal.add", [{"fields": {"TITLE": f"Table {number}", "OPPORTUNITY": number}} for number in range(3)]
)
out["added"] = len(ids)
got = bitrix.get_by_ID("crm.deal.get", [str(i) for i in ids])
out["got"] = sorted(deal["TITLE"] for deal in (got.values() if isinstance(got, dict) else got))
everything = bitrix.get_all("crm.deal.list", params={"select": ["ID", "TITLE", "OPPORTUNITY"]})
out["all"] = len(everything)
cheap = bitrix.get_all("crm.deal.list", params={"filter": {">OPPORTUNITY": 0}, "select": ["TITLE"]})
out["filtered"] = sorted(deal["TITLE"] for deal in cheap)
out["me"] = bitrix.call("user.current", raw=True)["result"]["ID"]
print(json.dumps(out))
