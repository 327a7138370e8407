from __future__ import annotations

from tests.helpers import INFER, ModelServer, classifier_config, infer_body, running_gateway


async def test_proxy_switch_and_events(blue: ModelServer, green: ModelServer) -> None:
    async with running_gateway(classifier_config(blue.url, green.url)) as gw:
        r = await gw.client.post(INFER, json=infer_body([[5.1, 3.5, 1.4, 0.2]]))
        assert r.status_code == 200
        assert r.json()["model_version"] == "v1"
        r = await gw.admin.post("/admin/routes/classifier/switch", json={"to": "green"})
        assert r.status_code == 200, r.text
        r = await gw.client.post(INFER, json=infer_body([[5.1, 3.5, 1.4, 0.2]]))
        assert r.json()["model_version"] == "v2"
        events = (await gw.admin.get("/admin/events")).json()["events"]
        assert [e["action"] for e in events] == ["switch"]
