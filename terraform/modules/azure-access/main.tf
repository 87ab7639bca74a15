# Least-privilege access to one cloudckpt container: a training managed identity with Storage Blob Data Contributor
# (read, write, delete blobs: push, retention, gc) and a CI managed identity with Storage Blob Data Reader (list and
# read: pull, verify), both assigned on the container only - not the account, the resource group or the subscription.
#
# Neither identity has a secret: AKS pods get tokens through workload identity (a federated credential per Kubernetes
# service account), CI through OIDC federation (e.g. GitHub Actions). The storage account accepts Entra ID tokens only
# (modules/azure-storage turns shared keys off).

resource "azurerm_user_assigned_identity" "training" {
  name                = "${var.name}-train"
  resource_group_name = var.resource_group_name
  location            = var.location
  tags                = var.tags
}

resource "azurerm_user_assigned_identity" "restore" {
  name                = "${var.name}-ci"
  resource_group_name = var.resource_group_name
  location            = var.location
  tags                = var.tags
}

resource "azurerm_role_assignment" "training" {
  scope                            = var.container_id
  role_definition_name             = "Storage Blob Data Contributor"
  principal_id                     = azurerm_user_assigned_identity.training.principal_id
  principal_type                   = "ServicePrincipal"
  skip_service_principal_aad_check = true
}

resource "azurerm_role_assignment" "restore" {
  scope                            = var.container_id
  role_definition_name             = "Storage Blob Data Reader"
  principal_id                     = azurerm_user_assigned_identity.restore.principal_id
  principal_type                   = "ServicePrincipal"
  skip_service_principal_aad_check = true
}

# AKS workload identity: each listed "namespace/serviceaccount" exchanges its token for the training identity's.
resource "azurerm_federated_identity_credential" "training" {
  for_each            = toset(var.aks_service_accounts)
  name                = replace("aks-${each.value}", "/", "-")
  resource_group_name = var.resource_group_name
  parent_id           = azurerm_user_assigned_identity.training.id
  audience            = ["api://AzureADTokenExchange"]
  issuer              = var.aks_oidc_issuer_url
  subject             = "system:serviceaccount:${replace(each.value, "/", ":")}"
}

# CI through OIDC (e.g. GitHub Actions: issuer https://token.actions.githubusercontent.com, subject
# repo:<org>/<repo>:ref:refs/heads/main) acts as the read-only restore identity.
resource "azurerm_federated_identity_credential" "ci" {
  for_each            = var.ci_subjects
  name                = "ci-${each.key}"
  resource_group_name = var.resource_group_name
  parent_id           = azurerm_user_assigned_identity.restore.id
  audience            = ["api://AzureADTokenExchange"]
  issuer              = var.ci_oidc_issuer_url
  subject             = each.value
}
