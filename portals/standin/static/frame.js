// The stand-in portal page's script: it posts the launch form into the app's frame and answers the JS
// library in that frame (static/bx24.js) over postMessage, as a Bitrix24 page answers BX24.js.
//
// Messages from the frame are objects {bx24standin: 1, sid: APP_SID, id, command, ...}; they count only
// from this page's iframe, from the origin the launch was posted to, with the APP_SID of this render.
// The answer goes back to that origin only: {bx24standin: 1, sid, id, command, data}.
//   getInitData   -> the launch fields (tokens, DOMAIN, LANG, PLACEMENT, PLACEMENT_OPTIONS, ...)
//   resizeWindow  -> sets the frame's height to message.height (fitWindow, resizeWindow)
//   installFinish -> POSTs to the portal, which records it; answers {install_finished: true}
//   refreshAuth   -> POSTs to the portal for fresh tokens; answers {AUTH_ID, REFRESH_ID, AUTH_EXPIRES}
(function () {
  "use strict";
  var frame = document.getElementById("app-frame");
  var config = JSON.parse(frame.getAttribute("data-standin"));
  var status = document.getElementById("standin-status");
  var sid = config.init.APP_SID;

  function report(command) {
    var body = new URLSearchParams({ sid: sid, secret: config.secret, command: command });
    return fetch(config.reportUrl, { method: "POST", body: body, credentials: "same-origin" }).then(
      function (response) {
        return response.json().then(function (answer) {
          if (!response.ok) {
            throw new Error(answer.error_description || "HTTP " + response.status);
          }
          return answer;
        });
      }
    );
  }

  window.addEventListener("message", function (event) {
    if (event.source !== frame.contentWindow || event.origin !== config.appOrigin) {
      return;
    }
    var message = event.data;
    if (!message || typeof message !== "object" || message.bx24standin !== 1 || message.sid !== sid) {
      return;
    }
    function reply(data) {
      frame.contentWindow.postMessage(
        { bx24standin: 1, sid: sid, id: message.id, command: message.command, data: data },
        config.appOrigin
      );
    }
    if (message.command === "getInitData") {
      reply(config.init);
    } else if (message.command === "resizeWindow") {
      var height = Number(message.height);
      if (height > 0) {
        frame.style.height = Math.min(height, 20000) + "px";
      }
      reply({});
    } else if (message.command === "installFinish") {
      report("installFinish").then(
        function (answer) {
          status.textContent = "installFinish called";
          reply(answer);
        },
        function (error) {
          status.textContent = "installFinish not recorded: " + error.message;
          reply({ error: error.message });
        }
      );
    } else if (message.command === "refreshAuth") {
      report("refreshAuth").then(
        function (answer) {
          config.init.AUTH_ID = answer.AUTH_ID;
          config.init.REFRESH_ID = answer.REFRESH_ID;
          config.init.AUTH_EXPIRES = answer.AUTH_EXPIRES;
          reply(answer);
        },
        function (error) {
          reply({ error: error.message });
        }
      );
    }
  });

  document.getElementById("launch").submit();
})();
