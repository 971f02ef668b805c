//! Tokens signed as Better Auth signs them (EdDSA from its JWKS by default, or RS256),
//! for the benchmark: `jwks <alg>` prints the JWKS a local server publishes, `sign <alg>`
//! reads `user token first_id` lines and prints them with the token re-signed.
//!
//! The keys are fixed (a constant Ed25519 seed, `bench/rs256-key.pem`): benchmark keys,
//! never used for anything else.
//!
//!   cargo run --release --example bench_tokens -- jwks EdDSA > jwks.json
//!   cargo run --release --example bench_tokens -- sign EdDSA < users.txt > users-eddsa.txt

use std::io::BufRead;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rsa::pkcs8::DecodePrivateKey;
use rsa::traits::PublicKeyParts;
use serde_json::{Value, json};

enum Key {
    Ed(ed25519_dalek::SigningKey),
    Rs(rsa::RsaPrivateKey),
}

impl Key {
    fn load(alg: &str) -> Self {
        match alg {
            "EdDSA" => Self::Ed(ed25519_dalek::SigningKey::from_bytes(&[7; 32])),
            "RS256" => {
                let pem = include_str!("../bench/rs256-key.pem");
                Self::Rs(rsa::RsaPrivateKey::from_pkcs8_pem(pem).expect("bench/rs256-key.pem"))
            }
            other => panic!("expected EdDSA or RS256, got {other}"),
        }
    }

    fn alg(&self) -> &'static str {
        match self {
            Self::Ed(_) => "EdDSA",
            Self::Rs(_) => "RS256",
        }
    }

    fn jwk(&self) -> Value {
        let enc = |bytes: &[u8]| URL_SAFE_NO_PAD.encode(bytes);
        let mut jwk = match self {
            Self::Ed(k) => {
                json!({"kty": "OKP", "crv": "Ed25519", "x": enc(k.verifying_key().as_bytes())})
            }
            Self::Rs(k) => {
                json!({"kty": "RSA", "n": enc(&k.n().to_bytes_be()), "e": enc(&k.e().to_bytes_be())})
            }
        };
        jwk["kid"] = json!(format!("bench-{}", self.alg()));
        jwk["alg"] = json!(self.alg());
        jwk
    }

    fn sign(&self, claims: &Value) -> String {
        let header =
            json!({"alg": self.alg(), "kid": format!("bench-{}", self.alg()), "typ": "JWT"});
        let message = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let signature = match self {
            Self::Ed(k) => {
                use ed25519_dalek::Signer;
                k.sign(message.as_bytes()).to_bytes().to_vec()
            }
            Self::Rs(k) => {
                use rsa::signature::{SignatureEncoding, Signer};
                let signer = rsa::pkcs1v15::SigningKey::<sha2::Sha256>::new(k.clone());
                signer.sign(message.as_bytes()).to_vec()
            }
        };
        format!("{message}.{}", URL_SAFE_NO_PAD.encode(signature))
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [command, alg] = args.as_slice() else {
        panic!("usage: bench_tokens jwks|sign EdDSA|RS256");
    };
    let key = Key::load(alg);
    match command.as_str() {
        "jwks" => println!("{}", json!({"keys": [key.jwk()]})),
        "sign" => {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_secs();
            for line in std::io::stdin().lock().lines() {
                let line = line.unwrap();
                let mut fields = line.split_whitespace();
                let (Some(user), Some(_), Some(first)) =
                    (fields.next(), fields.next(), fields.next())
                else {
                    continue;
                };
                let claims = json!({"sub": user, "iat": now, "exp": now + 7200});
                println!("{user} {} {first}", key.sign(&claims));
            }
        }
        other => panic!("unknown command {other}"),
    }
}
