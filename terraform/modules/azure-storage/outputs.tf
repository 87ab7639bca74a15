output "account_name" {
  description = "Name of the storage account (AZURE_STORAGE_ACCOUNT_NAME for cloudckpt)."
  value       = azurerm_storage_account.this.name
}

output "container_id" {
  description = "Resource manager id of the container: the scope of the role assignments (modules/azure-access)."
  value       = azurerm_storage_container.this.id
}

output "run_url_prefix" {
  description = "az:// URL of the container; append the run prefix."
  value       = "az://${azurerm_storage_container.this.name}"
}
