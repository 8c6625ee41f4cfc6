// A small stand-in for Bitrix24's JS library (BX24.js, sdk/bx24-js-sdk/), served by each stand-in portal
// at /api/v1/ — the path of the real one on api.bitrix24.com. Written for the stand-in from the docs.
//
// It works only inside the frame of a stand-in portal page (/app-frame/): the page posts the launch to
// the app with DOMAIN, PROTOCOL and APP_SID in the query string, and this library asks the page
// (window.parent, at PROTOCOL://DOMAIN) for the rest over postMessage (see static/frame.js).
//
//   BX24.init(callback)          runs callback once the page answered (bx24-init.md)
//   BX24.getAuth()               {access_token, refresh_token, expires_in (ms since 1970), domain,
//                                member_id}, or false before init / once expired (bx24-get-auth.md)
//   BX24.refreshAuth(callback)   fresh tokens from the page (bx24-refresh-auth.md)
//   BX24.callMethod(m, p, cb)    POSTs to PROTOCOL://DOMAIN/rest/<m>.json; cb gets a result with data(),
//                                error(), error_description(), more(), total(), time(), next()
//                                (bx24-call-method.md)
//   BX24.installFinish()         tells the page; the portal records it (bx24-install-finish.md)
//   BX24.fitWindow(cb), BX24.resizeWindow(w, h, cb)   resize the frame (bx24-fit-window.md)
//   BX24.callBatch(calls, cb, halt)  one `batch` request; cb gets a result per key (or per index) with the
//                                same methods as callMethod's (bx24-call-batch.md)
//   BX24.placement.info()        {placement, options} (options parsed from PLACEMENT_OPTIONS)
//   BX24.placement.call(command, params, cb)   a command of the widget's interface; the page answers
//   BX24.appOption.get/set, BX24.userOption.get/set   options kept by the portal page for this app/user
//   BX24.selectUser(cb)          the portal's user picker: the stand-in picks the user who opened the app
//   BX24.closeApplication()      the page closes the app's slider (it says so)
//   BX24.getLang(), BX24.getDomain(), BX24.isAdmin()
(function (global) {
  "use strict";

  var query = new URLSearchParams(global.location.search);
  var sid = query.get("APP_SID") || "";
  var portalOrigin = "";
  if (query.get("DOMAIN")) {
    portalOrigin = (query.get("PROTOCOL") === "1" ? "https://" : "http://") + query.get("DOMAIN");
  }
  if (!sid || !portalOrigin || global.parent === global) {
    // bx24-init.md: outside an application frame the library does not initialize.
    global.BX24 = null;
    throw new Error("Unable to initialize Bitrix24 JS library!");
  }

  var data = null; // the page's answer to getInitData
  var authUntil = 0; // when the access token expires, ms since 1970
  var initHandlers = [];
  var deferredCalls = [];
  var pending = {};
  var nextId = 1;

  function send(command, fields, callback) {
    var message = { bx24standin: 1, sid: sid, id: nextId++, command: command };
    Object.keys(fields || {}).forEach(function (key) {
      message[key] = fields[key];
    });
    if (callback) {
      pending[message.id] = callback;
    }
    global.parent.postMessage(message, portalOrigin);
  }

  global.addEventListener("message", function (event) {
    if (event.source !== global.parent || event.origin !== portalOrigin) {
      return;
    }
    var message = event.data;
    if (!message || typeof message !== "object" || message.bx24standin !== 1 || message.sid !== sid) {
      return;
    }
    var callback = pending[message.id];
    delete pending[message.id];
    if (callback) {
      callback(message.data || {});
    }
  });

  function setAuth(fields) {
    data.AUTH_ID = fields.AUTH_ID;
    data.REFRESH_ID = fields.REFRESH_ID;
    data.AUTH_EXPIRES = fields.AUTH_EXPIRES;
    authUntil = Date.now() + Number(fields.AUTH_EXPIRES) * 1000;
  }

  // PHP-style form keys (fields[TITLE]=…, filter[>ID]=…), as the portal reads REST parameters.
  function encode(params) {
    var pairs = [];
    function walk(key, value) {
      if (value === null || value === undefined) {
        return;
      }
      if (Array.isArray(value)) {
        value.forEach(function (item, index) {
          walk(key + "[" + index + "]", item);
        });
      } else if (typeof value === "object") {
        Object.keys(value).forEach(function (name) {
          walk(key + "[" + name + "]", value[name]);
        });
      } else {
        var text = value === true ? "1" : value === false ? "0" : String(value);
        pairs.push(encodeURIComponent(key) + "=" + encodeURIComponent(text));
      }
    }
    Object.keys(params).forEach(function (name) {
      walk(name, params[name]);
    });
    return pairs.join("&");
  }

  function RestError(status, code, description) {
    this.status = status;
    this.ex = { error: code, error_description: description };
  }
  RestError.prototype.toString = function () {
    // Some errors have an empty code (a CRM record that does not exist): the description alone then.
    if (!this.ex.error) {
      return this.ex.error_description;
    }
    return this.ex.error + (this.ex.error_description ? ": " + this.ex.error_description : "");
  };

  function Result(answer, status, method, params, callback) {
    this.answer = answer;
    this.status = status;
    this.query = { method: method, data: params, callback: callback };
  }
  Result.prototype.error = function () {
    // An error is an answer with an `error` key (its code may be empty) and no `result`.
    if (this.status === 200 && this.answer && !("error" in this.answer && !("result" in this.answer))) {
      return undefined;
    }
    var answer = this.answer || {};
    var code = typeof answer.error === "string" ? answer.error : "NETWORK_ERROR";
    return new RestError(this.status, code, answer.error_description || "");
  };
  Result.prototype.error_description = function () {
    var error = this.error();
    return error ? error.ex.error_description : "";
  };
  Result.prototype.data = function () {
    return this.error() ? undefined : this.answer.result;
  };
  Result.prototype.more = function () {
    return !this.error() && this.answer.next !== undefined;
  };
  Result.prototype.total = function () {
    return this.error() ? 0 : Number(this.answer.total || 0);
  };
  Result.prototype.time = function () {
    return this.answer ? this.answer.time : undefined;
  };
  Result.prototype.next = function (callback) {
    if (!this.more()) {
      return false;
    }
    var params = Object.assign({}, this.query.data, { start: this.answer.next });
    callMethod(this.query.method, params, callback || this.query.callback);
    return true;
  };

  function post(method, params, callback, retried) {
    var body = encode(Object.assign({}, params, { auth: data.AUTH_ID }));
    fetch(portalOrigin + "/rest/" + encodeURIComponent(method) + ".json", {
      method: "POST",
      headers: { "Content-Type": "application/x-www-form-urlencoded; charset=UTF-8" },
      body: body,
      credentials: "omit",
    })
      .then(function (response) {
        return response.json().then(
          function (answer) {
            return { answer: answer, status: response.status };
          },
          function () {
            return { answer: null, status: response.status };
          }
        );
      })
      .catch(function (error) {
        return { answer: { error: "NETWORK_ERROR", error_description: String(error) }, status: 0 };
      })
      .then(function (outcome) {
        var code = outcome.answer && outcome.answer.error;
        if (!retried && code === "expired_token") {
          // The library refreshes an expired token by itself (bx24-get-auth.md).
          refreshAuth(function () {
            post(method, params, callback, true);
          });
          return;
        }
        if (callback) {
          callback(new Result(outcome.answer, outcome.status, method, params, callback));
        }
      });
  }

  function callMethod(method, params, callback) {
    var call = function () {
      post(method, params || {}, callback, false);
    };
    if (data) {
      call();
    } else {
      deferredCalls.push(call); // bx24-call-method.md: calls before init are delayed, not lost
    }
  }

  // bx24-call-batch.md: `calls` is an object ({key: [method, params]} or {key: {method, params}}) or an
  // array; the callback gets the results keyed the same way.
  function callBatch(calls, callback, halt) {
    var keys = Object.keys(calls);
    var cmd = {};
    var methods = {};
    keys.forEach(function (key) {
      var call = calls[key];
      var method = Array.isArray(call) ? call[0] : call.method;
      var params = (Array.isArray(call) ? call[1] : call.params) || {};
      var query = encode(params);
      methods[key] = method;
      cmd[key] = method + (query ? "?" + query : "");
    });
    callMethod("batch", { halt: halt ? 1 : 0, cmd: cmd }, function (outer) {
      var body = outer.data() || {};
      var results = Array.isArray(calls) ? [] : {};
      keys.forEach(function (key) {
        var error = body.result_error && body.result_error[key];
        var answer = error
          ? error
          : {
              result: body.result ? body.result[key] : undefined,
              total: body.result_total ? body.result_total[key] : undefined,
              next: body.result_next ? body.result_next[key] : undefined,
            };
        var status = outer.error() ? outer.status : error ? 400 : 200;
        results[key] = new Result(outer.error() ? outer.answer : answer, status, methods[key], {}, undefined);
      });
      if (callback) {
        callback(results);
      }
    });
  }

  function options(kind) {
    return {
      get: function (name) {
        var kept = (data && data[kind]) || {};
        return name === undefined ? kept : kept[name];
      },
      set: function (name, value, callback) {
        var fields = {};
        fields[name] = value;
        if (data) {
          data[kind] = data[kind] || {};
          data[kind][name] = value;
        }
        send(kind === "APP_OPTIONS" ? "setAppOption" : "setUserOption", { options: fields }, function () {
          if (callback) {
            callback();
          }
        });
      },
    };
  }

  function refreshAuth(callback) {
    send("refreshAuth", {}, function (answer) {
      if (answer.AUTH_ID) {
        setAuth(answer);
      }
      if (callback) {
        callback(BX24.getAuth());
      }
    });
  }

  function parseOptions(text) {
    if (!text) {
      return {};
    }
    try {
      var options = JSON.parse(text);
      return options && typeof options === "object" ? options : {};
    } catch (error) {
      return {};
    }
  }

  var BX24 = {
    init: function (callback) {
      if (typeof callback !== "function") {
        return;
      }
      if (data) {
        setTimeout(callback, 0);
      } else {
        initHandlers.push(callback);
      }
    },
    getAuth: function () {
      if (!data || Date.now() >= authUntil) {
        return false;
      }
      return {
        access_token: data.AUTH_ID,
        refresh_token: data.REFRESH_ID,
        expires_in: authUntil,
        domain: data.DOMAIN,
        member_id: data.member_id,
      };
    },
    refreshAuth: refreshAuth,
    callMethod: callMethod,
    installFinish: function () {
      send("installFinish", {});
    },
    resizeWindow: function (width, height, callback) {
      send("resizeWindow", { width: Number(width), height: Number(height) }, function () {
        if (callback) {
          callback();
        }
      });
    },
    fitWindow: function (callback) {
      var root = document.documentElement;
      BX24.resizeWindow(root.scrollWidth, root.scrollHeight, callback);
    },
    getLang: function () {
      return data ? data.LANG : undefined;
    },
    getDomain: function () {
      return data ? data.DOMAIN : undefined;
    },
    isAdmin: function () {
      return Boolean(data && data.IS_ADMIN);
    },
    callBatch: callBatch,
    appOption: options("APP_OPTIONS"),
    userOption: options("USER_OPTIONS"),
    selectUser: function (callback) {
      send("selectUser", {}, function (user) {
        if (callback) {
          callback(user);
        }
      });
    },
    closeApplication: function () {
      send("closeApplication", {});
    },
    placement: {
      info: function () {
        return data
          ? { placement: data.PLACEMENT, options: parseOptions(data.PLACEMENT_OPTIONS) }
          : { placement: undefined, options: {} };
      },
      call: function (command, params, callback) {
        send("placementCall", { name: command, params: params || {} }, function (answer) {
          if (callback) {
            callback(answer);
          }
        });
      },
    },
  };
  global.BX24 = BX24;

  send("getInitData", {}, function (answer) {
    data = answer;
    setAuth(answer);
    initHandlers.splice(0).forEach(function (handler) {
      setTimeout(handler, 0);
    });
    deferredCalls.splice(0).forEach(function (call) {
      call();
    });
  });
})(window);
