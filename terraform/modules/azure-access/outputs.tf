output "training_client_id" {
  description = "Client id of the training identity (the AKS service account's azure.workload.identity/client-id)."
  value       = azurerm_user_assigned_identity.training.client_id
}

output "restore_client_id" {
  description = "Client id of the read-only CI identity (AZURE_CLIENT_ID in the CI job)."
  value       = azurerm_user_assigned_identity.restore.client_id
}

output "training_principal_id" {
  description = "Object id of the training identity (holds Storage Blob Data Contributor on the container)."
  value       = azurerm_user_assigned_identity.training.principal_id
}

output "restore_principal_id" {
  description = "Object id of the CI identity (holds Storage Blob Data Reader on the container)."
  value       = azurerm_user_assigned_identity.restore.principal_id
}
