# Deny on the breakglass keys, to ADD to the existing terraform-state policy.
#
# Why (ADR 0001): terraform-state grants the whole claude-agent namespace
# secret/data/* (and friends), and that namespace runs Bash-wielding agents that
# ingest untrusted input. Without this deny a prompt-injected agent could read
# root-on-devvm credentials.
#
# Why so many stanzas (docs/architecture.md, section 6):
# - Vault/OpenBao picks ONE matching path rule per request, the most specific.
#   "secret/data/breakglass/*" beats "secret/data/*", but a single glob such as
#   "secret/+/breakglass/*" does NOT (its wildcard comes earlier, so the broader
#   grant wins): each KV v2 prefix is denied on its own line.
# - "secret/data/breakglass/*" does not cover "secret/data/breakglass" itself:
#   the exact path is denied as well.
# - KV v2 answers under data/ metadata/ delete/ undelete/ destroy/ subkeys/ and,
#   on OpenBao, detailed-metadata/ too (`bao path-help secret/` lists them).
#
# Append this file to terraform-state and rewrite it, e.g.:
#   bao policy read terraform-state > terraform-state.hcl
#   cat docs/vault/terraform-state-deny-breakglass.hcl >> terraform-state.hcl
#   bao policy write terraform-state terraform-state.hcl
# If terraform-state uses another KV mount than "secret", repeat for that mount.

path "secret/data/breakglass" {
  capabilities = ["deny"]
}
path "secret/data/breakglass/*" {
  capabilities = ["deny"]
}
path "secret/metadata/breakglass" {
  capabilities = ["deny"]
}
path "secret/metadata/breakglass/*" {
  capabilities = ["deny"]
}
path "secret/delete/breakglass" {
  capabilities = ["deny"]
}
path "secret/delete/breakglass/*" {
  capabilities = ["deny"]
}
path "secret/undelete/breakglass" {
  capabilities = ["deny"]
}
path "secret/undelete/breakglass/*" {
  capabilities = ["deny"]
}
path "secret/destroy/breakglass" {
  capabilities = ["deny"]
}
path "secret/destroy/breakglass/*" {
  capabilities = ["deny"]
}
path "secret/subkeys/breakglass" {
  capabilities = ["deny"]
}
path "secret/subkeys/breakglass/*" {
  capabilities = ["deny"]
}
path "secret/detailed-metadata/breakglass" {
  capabilities = ["deny"]
}
path "secret/detailed-metadata/breakglass/*" {
  capabilities = ["deny"]
}
