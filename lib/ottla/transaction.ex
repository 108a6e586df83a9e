defmodule Ottla.Transaction do
  @moduledoc false
  # The Elixir half of `Ottla.transaction/3` (native/ottla_nif/src/transaction.rs). The NIF
  # queues the caller on the producer's transaction thread and answers
  # {:ottla_txn, tag, result} when its transaction opens, and again when it has committed or
  # aborted. While it is open, this process's produce calls to the connection carry its id
  # (kept in the process dictionary), and the producer takes no other process's messages.

  alias Ottla.{Connection, Native, Options}

  # The Rust side honours the call's own timeout; this covers the reply's trip.
  @margin 2_000

  @doc "See `Ottla.transaction/3`."
  def run(connection, fun, opts) do
    opts = Options.keyword!(opts, [timeout: 30_000], "Ottla.transaction/3 options")
    timeout = Options.timeout!(opts[:timeout], :timeout)

    unless is_function(fun, 0),
      do: raise(ArgumentError, "invalid fun #{inspect(fun)}: expected a function of no arguments")

    with {:ok, conn} <- transactional(connection) do
      if Process.get(key(conn)) do
        raise ArgumentError,
              "Ottla.transaction/3 called inside a transaction on connection " <>
                "#{inspect(conn.name)}: transactions do not nest"
      end

      Ottla.Telemetry.span([:ottla, :transaction], %{}, %{connection: conn.name}, fn ->
        result = in_transaction(conn, fun, timeout)
        outcome = if match?({:ok, _}, result), do: :committed, else: :failed
        {result, %{}, %{result: outcome}}
      end)
    end
  end

  @doc """
  The id of the transaction this process has open on `conn`'s producer: 0 when the producer
  is not transactional, `nil` when it is and this process has none open.
  """
  @spec current(Connection.t()) :: non_neg_integer | nil
  def current(%Connection{transactional?: false}), do: 0
  def current(%Connection{} = conn), do: Process.get(key(conn))

  @doc """
  Runs `fun` (which produces with the transaction's id) in a transaction of its own, for a
  produce call on a transactional connection made outside `Ottla.transaction/3`. `fun`
  returns `:ok` or `{:error, error, failed}`; a failure aborts the transaction.
  """
  def produce_alone(conn, timeout, fun) do
    case open(conn.producer, timeout) do
      {:ok, call, tag, id} ->
        Process.put(key(conn), id)

        result =
          try do
            fun.(id)
          after
            Process.delete(key(conn))
          end

        case result do
          :ok ->
            case finish(call, tag, true, timeout) do
              :ok -> :ok
              {:error, error} -> {:error, error}
            end

          {:error, error, _failed} ->
            _ = finish(call, tag, false, timeout)
            {:error, %{error | message: error.message <> "; the call's transaction was aborted"}}
        end

      {:error, error} ->
        {:error, error}
    end
  end

  defp in_transaction(conn, fun, timeout) do
    case open(conn.producer, timeout) do
      {:ok, call, tag, id} ->
        Process.put(key(conn), id)

        try do
          fun.()
        catch
          kind, reason ->
            Process.delete(key(conn))
            _ = finish(call, tag, false, timeout)
            :erlang.raise(kind, reason, __STACKTRACE__)
        else
          result ->
            Process.delete(key(conn))

            case finish(call, tag, true, timeout) do
              :ok -> {:ok, result}
              {:error, error} -> {:error, error}
            end
        end

      {:error, error} ->
        {:error, error}
    end
  end

  defp transactional(connection) when is_atom(connection) and connection not in [nil, true] do
    case Connection.lookup(connection) do
      nil ->
        {:error,
         Ottla.Error.new(
           :no_connection,
           "no Ottla connection named #{inspect(connection)} is running"
         )}

      %Connection{producer: nil} ->
        {:error,
         Ottla.Error.new(
           :no_producer,
           "connection #{inspect(connection)} was started without a :producer option"
         )}

      %Connection{transactional?: false} ->
        {:error,
         Ottla.Error.new(
           :not_transactional,
           "the producer of connection #{inspect(connection)} has no :transactional_id"
         )}

      conn ->
        {:ok, conn}
    end
  end

  defp transactional(other),
    do:
      raise(
        ArgumentError,
        "invalid connection #{inspect(other)}: expected the name of a running Ottla connection"
      )

  defp key(conn), do: {__MODULE__, conn.producer}

  # Waits (up to `timeout`) for this caller's turn: {:ok, call, tag, id} once its transaction
  # is open.
  defp open(producer, timeout) do
    tag = System.unique_integer([:positive])

    case Native.transaction_begin(producer, tag) do
      {:ok, call} ->
        receive do
          {:ottla_txn, ^tag, {:ok, id}} -> {:ok, call, tag, id}
          {:ottla_txn, ^tag, {:error, error}} -> {:error, error}
        after
          timeout ->
            late =
              Ottla.Error.new(
                :timed_out,
                "no transaction could begin within #{timeout} ms (the cluster is unreachable, " <>
                  "or other transactions on the connection took the time)",
                true
              )

            # The NIF answers with the queue's state; any answer it gave is in the mailbox.
            case Native.transaction_cancel(call) do
              :cancelled ->
                {:error, late}

              :open ->
                receive do
                  {:ottla_txn, ^tag, {:ok, _}} -> :ok
                end

                _ = finish(call, tag, false, timeout)
                {:error, late}

              :gone ->
                receive do
                  {:ottla_txn, ^tag, {:error, error}} -> {:error, error}
                after
                  0 -> {:error, late}
                end
            end
        end

      {:error, error} ->
        {:error, error}
    end
  end

  defp finish(call, tag, commit?, timeout) do
    case Native.transaction_finish(call, commit?, timeout) do
      :ok ->
        receive do
          {:ottla_txn, ^tag, {:ok, _}} -> :ok
          {:ottla_txn, ^tag, {:error, error}} -> {:error, error}
        after
          timeout + @margin ->
            error =
              Ottla.Error.new(
                :timed_out,
                "no answer from the transaction within #{timeout} ms; its outcome is unknown",
                true
              )

            {:error, %{error | possibly_persisted?: commit?}}
        end

      {:error, error} ->
        {:error, error}
    end
  end
end
