# breakglass-read: the only Vault policy the breakglass console holds (ADR 0001).
#
# It reads exactly one KV v2 secret, the breakglass SSH keys and pinned host keys
# (schema: docs/keys.md), and nothing else: no list, no write, no other secret.
# Apply with:  bao policy write breakglass-read docs/vault/breakglass-read.hcl
# (or `vault policy write ...`). Adjust "secret" and "breakglass/ssh" if you moved
# the secret (BREAKGLASS_VAULT_KV_MOUNT / BREAKGLASS_VAULT_SECRET_PATH).

# The secret's current version (what the console reads).
path "secret/data/breakglass/ssh" {
  capabilities = ["read"]
}

# Its metadata (versions, deletion state), so a deleted version can be told
# apart from a missing secret in the console's error message.
path "secret/metadata/breakglass/ssh" {
  capabilities = ["read"]
}

# The role sets token_no_default_policy, so the console's token has not even the
# "default" policy: it may only drop itself once the keys are read.
path "auth/token/revoke-self" {
  capabilities = ["update"]
}
