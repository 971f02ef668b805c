// A real Better Auth server for the interop tests: email/password sign-in, the jwt
// plugin signing with the algorithm given, in-memory storage, on 127.0.0.1.
//
//   node server.mjs <EdDSA|ES256|ES512|RS256|PS256> [port]
//
// Prints "listening <base URL>" once it accepts requests.
import { createServer } from "node:http";
import { betterAuth } from "better-auth";
import { memoryAdapter } from "better-auth/adapters/memory";
import { toNodeHandler } from "better-auth/node";
import { jwt } from "better-auth/plugins";

const alg = process.argv[2] ?? "EdDSA";
const port = Number(process.argv[3] ?? 0);
const keyPairConfig = {
  EdDSA: { alg: "EdDSA", crv: "Ed25519" },
  ES256: { alg: "ES256" },
  ES512: { alg: "ES512" },
  RS256: { alg: "RS256", modulusLength: 2048 },
  PS256: { alg: "PS256", modulusLength: 2048 },
}[alg];
if (!keyPairConfig) {
  console.error(`unknown algorithm ${alg}`);
  process.exit(2);
}

const server = createServer();
server.listen(port, "127.0.0.1", () => {
  const baseURL = `http://127.0.0.1:${server.address().port}`;
  const auth = betterAuth({
    baseURL,
    secret: "interop-test-secret-interop-test-secret",
    database: memoryAdapter({ user: [], session: [], account: [], verification: [], jwks: [] }),
    emailAndPassword: { enabled: true },
    plugins: [jwt({ jwks: { keyPairConfig } })],
    telemetry: { enabled: false },
  });
  server.on("request", toNodeHandler(auth));
  console.log(`listening ${baseURL}`);
});
