// A grpc-js client of the door manager (examples/grpc/doors.proto), for the real-client tests:
//   node doors_client.js HOST:PORT PROTO CALL...   where CALL is GetName or SetAccessCode
// All calls go over one channel, in order; one JSON line per call on stdout:
//   {"method": ..., "ok": true, "reply": {...}} or {"method": ..., "ok": false, "code": N,
//   "details": "..."}.
"use strict";
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const [target, protoPath, ...calls] = process.argv.slice(2);
const definition = protoLoader.loadSync(protoPath, { keepCase: true, defaults: true });
const doors = grpc.loadPackageDefinition(definition).doors;
const client = new doors.DoorManager(target, grpc.credentials.createInsecure());
const requests = {
  GetName: { door_id: "front" },
  SetAccessCode: { door_id: "front", code: "1138" },
};

function call(method) {
  return new Promise((resolve) => {
    const deadline = new Date(Date.now() + 10000);
    client[method](requests[method], { deadline }, (err, reply) => {
      if (err) resolve({ method, ok: false, code: err.code, details: err.details });
      else resolve({ method, ok: true, reply });
    });
  });
}

(async () => {
  for (const method of calls) {
    process.stdout.write(JSON.stringify(await call(method)) + "\n");
  }
  client.close();
})();
