defmodule Ottla.Transaction do
  @moduledoc false
  # The Elixir half of `Ottla.transaction/3` (native/ottla_nif/src/transaction.rs). The NIF
  # queues the caller on the producer's transaction thread and answers
  # {:ottla_txn, tag, result} when its transaction opens, and again when it has committed or
  # aborted. While it is open, this process's produce calls to the connection carry its id
  # (kept in the process dictionary under the connection's name, with the producer it was
  # opened on), and the producer takes no other process's messages. A produce call that
  # fails inside the transaction marks it: it is aborted instead of committed.

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
      if Process.get(key(conn)) != nil do
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
  is not transactional, `nil` when it is and this process has none open, `:stale` when the
  transaction was opened on a producer the connection has since replaced (a restart).
  """
  @spec current(Connection.t()) :: non_neg_integer | nil | :stale
  def current(%Connection{transactional?: false}), do: 0

  def current(%Connection{producer: producer} = conn) do
    case Process.get(key(conn)) do
      nil -> nil
      %{producer: ^producer, id: id} -> id
      %{} -> :stale
    end
  end

  @doc "A produce call inside this process's open transaction on `conn` failed: it must abort."
  @spec failed(Connection.t(), Ottla.Error.t()) :: :ok
  def failed(conn, error) do
    case Process.get(key(conn)) do
      %{failed: nil} = open -> Process.put(key(conn), %{open | failed: error})
      _ -> :ok
    end

    :ok
  end

  @doc "The error for a produce call in a transaction opened on a producer since replaced."
  def stale_error(conn) do
    Ottla.Error.new(
      :not_in_transaction,
      "connection #{inspect(conn.name)} restarted its producer during this transaction: " <>
        "the transaction is gone, and will be reported as failed"
    )
  end

  @doc """
  Runs `fun` (which produces with the transaction's id) in a transaction of its own, for a
  produce call on a transactional connection made outside `Ottla.transaction/3`. `fun`
  returns `:ok` or `{:error, error, failed}`; a failure aborts the transaction.
  """
  def produce_alone(conn, timeout, fun) do
    produce = fn ->
      with {:error, error, _failed} <- fun.(current(conn)), do: failed(conn, error)
    end

    with {:ok, _} <- in_transaction(conn, produce, timeout), do: :ok
  end

  @doc """
  An exactly-once consumer's batch: produces `messages` (a list of `{topic, message}`) to the
  consumer's connection and commits them in one transaction with the batch's offset `next`
  (`batch` is `{resource, topic, partition, generation, first, next}`). `:ok`, or
  `{:error, %Ottla.Error{}}` when nothing of it was committed (`code: :already_committed`
  when an earlier transaction committed the batch).
  """
  def commit_batch(connection, batch, messages, timeout) do
    with {:ok, conn} <- transactional(connection) do
      produce = fn ->
        Enum.each(Enum.chunk_by(messages, &elem(&1, 0)), fn [{topic, _} | _] = chunk ->
          case Ottla.produce(connection, topic, Enum.map(chunk, &elem(&1, 1)), timeout: timeout) do
            :ok -> :ok
            {:error, error, _failed} -> failed(conn, error)
          end
        end)
      end

      Ottla.Telemetry.span([:ottla, :transaction], %{}, %{connection: conn.name}, fn ->
        result = with {:ok, _} <- in_transaction(conn, produce, timeout, batch), do: :ok
        {result, %{}, %{result: if(result == :ok, do: :committed, else: :failed)}}
      end)
    end
  end

  defp in_transaction(conn, fun, timeout, batch \\ nil) do
    # An exactly-once batch may share its transaction with the others ready at the same time.
    case open(conn.producer, timeout, batch != nil) do
      {:ok, call, tag, id} ->
        Process.put(key(conn), %{producer: conn.producer, id: id, failed: nil})

        try do
          fun.()
        catch
          kind, reason ->
            Process.delete(key(conn))
            _ = finish(call, tag, false, timeout)
            :erlang.raise(kind, reason, __STACKTRACE__)
        else
          result ->
            case Process.delete(key(conn)) do
              %{failed: nil} ->
                case commit(call, tag, batch, timeout) do
                  :ok -> {:ok, result}
                  {:error, error} -> {:error, error}
                end

              %{failed: error} ->
                case abort(call, tag, batch, timeout) do
                  # Why the produce failed: the producer was fenced.
                  {:error, %Ottla.Error{code: :fenced} = fenced} ->
                    {:error, fenced}

                  _ ->
                    {:error,
                     %{
                       error
                       | message:
                           "a produce call in the transaction failed, so it was aborted: " <>
                             error.message
                     }}
                end
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

  defp key(conn), do: {__MODULE__, conn.name}

  # Waits (up to `timeout`) for this caller's turn: {:ok, call, tag, id} once its transaction
  # is open.
  defp open(producer, timeout, share?) do
    tag = System.unique_integer([:positive])

    case Native.transaction_begin(producer, tag, share?) do
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
                # Refused, or opened and ended by the producer's stop: the answer was sent
                # before the NIF said so.
                receive do
                  {:ottla_txn, ^tag, {:error, error}} -> {:error, error}
                  {:ottla_txn, ^tag, {:ok, _}} -> {:error, late}
                after
                  @margin -> {:error, late}
                end
            end
        end

      {:error, error} ->
        {:error, error}
    end
  end

  defp commit(call, tag, nil, timeout), do: finish(call, tag, true, timeout)
  defp commit(call, tag, batch, timeout), do: finish_batch(call, tag, true, batch, timeout)

  defp abort(call, tag, nil, timeout), do: finish(call, tag, false, timeout)
  defp abort(call, tag, batch, timeout), do: finish_batch(call, tag, false, batch, timeout)

  defp finish_batch(call, tag, commit?, batch, timeout) do
    {resource, topic, partition, generation, first, next} = batch

    answer(
      Native.transaction_commit_batch(
        call,
        commit?,
        timeout,
        resource,
        topic,
        partition,
        generation,
        first,
        next
      ),
      tag,
      commit?,
      timeout
    )
  end

  defp finish(call, tag, commit?, timeout),
    do: answer(Native.transaction_finish(call, commit?, timeout), tag, commit?, timeout)

  defp answer(sent, tag, commit?, timeout) do
    case sent do
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
