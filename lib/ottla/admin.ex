defmodule Ottla.Admin do
  @moduledoc false
  # Metadata lookups the library makes for itself.

  alias Ottla.{Native, Reply}

  @doc "The partition count of `topic`: `{:ok, count}` or `{:error, %Ottla.Error{}}`."
  @spec partition_count(String.t(), [{String.t(), String.t()}], String.t(), pos_integer) ::
          {:ok, pos_integer} | {:error, Ottla.Error.t()}
  def partition_count(bootstrap, config, topic, timeout) do
    Reply.await(
      &Native.admin_partition_count(&1, &2, bootstrap, config, topic, timeout),
      timeout
    )
  end
end
