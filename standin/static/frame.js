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
//
// And Bitrix24's own protocol, which the official JS SDK (@bitrix24/b24jssdk) speaks: strings
// "command:params:callbackKey:APP_SID" (params JSON, left out when empty), answered "callbackKey:JSON"
// (docs/bitrix24-protocol.md §8): getInitData, refreshAuth, setInstallFinish, setInstall, resizeWindow,
// setTitle, setScroll, reloadWindow, setAppOption, setUserOption, closeApplication, selectUser.
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

  var appOptions = {};
  var userOptions = {};

  function initData() {
    var init = config.init;
    return {
      DOMAIN: init.DOMAIN,
      PROTOCOL: Number(init.PROTOCOL),
      LANG: init.LANG,
      APP_SID: init.APP_SID,
      PATH: init.PATH,
      AUTH_ID: init.AUTH_ID,
      AUTH_EXPIRES: Number(init.AUTH_EXPIRES),
      REFRESH_ID: init.REFRESH_ID,
      MEMBER_ID: init.MEMBER_ID,
      IS_ADMIN: init.IS_ADMIN,
      PLACEMENT: init.PLACEMENT,
      PLACEMENT_OPTIONS: init.SDK_PLACEMENT_OPTIONS,
      INSTALL: init.INSTALL,
      FIRST_RUN: init.FIRST_RUN,
      APP_OPTIONS: appOptions,
      USER_OPTIONS: userOptions,
    };
  }

  function resize(height) {
    height = Number(height);
    if (height > 0) {
      frame.style.height = Math.min(height, 20000) + "px";
    }
  }

  // Bitrix24's string protocol. The callback key is the next to last part, APP_SID the last; what lies
  // between (JSON that may hold colons itself) is the command's parameters.
  function onString(text) {
    var parts = text.split(":");
    if (parts.length < 3 || parts[parts.length - 1] !== sid) {
      return;
    }
    var command = parts[0];
    var key = parts[parts.length - 2];
    var raw = parts.slice(1, parts.length - 2).join(":");
    var params = {};
    if (raw) {
      try {
        params = JSON.parse(raw);
      } catch (error) {
        params = raw;
      }
    }
    function answer(data) {
      frame.contentWindow.postMessage(key + ":" + JSON.stringify(data === undefined ? {} : data), config.appOrigin);
    }
    if (command === "getInitData") {
      answer(initData());
    } else if (command === "refreshAuth") {
      report("refreshAuth").then(function (fresh) {
        config.init.AUTH_ID = fresh.AUTH_ID;
        config.init.REFRESH_ID = fresh.REFRESH_ID;
        config.init.AUTH_EXPIRES = fresh.AUTH_EXPIRES;
        answer({ AUTH_ID: fresh.AUTH_ID, REFRESH_ID: fresh.REFRESH_ID, AUTH_EXPIRES: Number(fresh.AUTH_EXPIRES) });
      });
    } else if (command === "setInstallFinish") {
      report("installFinish").then(
        function () {
          status.textContent = "installFinish called";
          answer({});
        },
        function (error) {
          status.textContent = "installFinish not recorded: " + error.message;
          answer({ error: error.message });
        }
      );
    } else if (command === "resizeWindow") {
      resize(params && params.height);
      answer({});
    } else if (command === "setAppOption" || command === "setUserOption") {
      var store = command === "setAppOption" ? appOptions : userOptions;
      if (params && typeof params === "object") {
        for (var name in params) {
          store[name] = params[name];
        }
      }
      answer({});
    } else if (command === "selectUser") {
      // The portal's user picker: the stand-in picks the user who opened the app.
      var user = { id: String(config.init.USER_ID), name: "User" + config.init.USER_ID };
      answer(params && params.mult ? [user] : user);
    } else if (command === "closeApplication") {
      status.textContent = "closeApplication called";
      answer({});
    } else {
      // setInstall, setTitle, setScroll, reloadWindow …: nothing to show here, acknowledged.
      answer({});
    }
  }

  window.addEventListener("message", function (event) {
    if (event.source !== frame.contentWindow || event.origin !== config.appOrigin) {
      return;
    }
    if (typeof event.data === "string") {
      onString(event.data);
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
      reply(Object.assign({}, config.init, { APP_OPTIONS: appOptions, USER_OPTIONS: userOptions }));
    } else if (message.command === "setAppOption" || message.command === "setUserOption") {
      var kept = message.command === "setAppOption" ? appOptions : userOptions;
      var given = message.options || {};
      for (var key in given) {
        kept[key] = given[key];
      }
      reply({});
    } else if (message.command === "selectUser") {
      reply({ id: String(config.init.USER_ID), name: "User" + config.init.USER_ID });
    } else if (message.command === "closeApplication") {
      status.textContent = "closeApplication called";
      reply({});
    } else if (message.command === "placementCall") {
      status.textContent = "placement.call " + message.name;
      reply({ called: message.name });
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
