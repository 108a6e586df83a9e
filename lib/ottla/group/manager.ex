defmodule Ottla.Group.Manager do
  @moduledoc false
  # Owns a connection's native consumer. Reacts to what the NIF reports: assignments (start
  # a worker per partition), revocations (stop them, call the user's handler, answer so the
  # rebalance proceeds) and worker deaths (rewind, restart with backoff).
  use GenServer
  require Logger

  alias Ottla.Native

  @max_backoff 30_000

  def start_link(opts), do: GenServer.start_link(__MODULE__, opts)

  @doc "The native consumer of a connection, or nil."
  def resource(connection), do: :persistent_term.get({__MODULE__, connection}, nil)

  @impl true
  def init(opts) do
    Process.flag(:trap_exit, true)
    connection = opts.connection

    with {:ok, assignment} <- assignment(opts),
         {:ok, resource} <-
           Native.consumer_new(
             opts.bootstrap,
             opts.props,
             self(),
             opts.topics,
             assignment,
             {opts.max_batch, opts.max_backlog, opts.drain_timeout, opts.commit_interval}
           ) do
      :persistent_term.put({__MODULE__, connection}, resource)
      {:ok, Map.merge(opts, %{resource: resource, partitions: %{}})}
    else
      {:error, error} -> {:stop, error}
    end
  end

  # Group mode subscribes; assign mode (Elsa's `consumer:`) lists its partitions.
  defp assignment(%{mode: :group}), do: {:ok, []}

  defp assignment(%{mode: :assign, topics: [topic]} = opts) do
    partitions =
      case opts.partition do
        :all ->
          with {:ok, topics} <-
                 Native.admin_list_topics(opts.bootstrap, opts.connection_config, 10_000) do
            case List.keyfind(topics, topic, 0) do
              {^topic, count} ->
                {:ok, Enum.to_list(0..(count - 1))}

              nil ->
                {:error,
                 Ottla.Error.new(
                   :unknown_topic_or_partition,
                   "topic #{inspect(topic)} does not exist"
                 )}
            end
          end

        p ->
          {:ok, [p]}
      end

    offset =
      case opts.begin_offset do
        :earliest -> -1
        :latest -> -2
        n -> n
      end

    with {:ok, list} <- partitions, do: {:ok, Enum.map(list, &{topic, &1, offset})}
  end

  @impl true
  def handle_info({:ottla_assigned, _id, generation, tps}, state) do
    Logger.info("assigned #{inspect(tps)} at generation #{inspect(generation)}",
      connection: state.connection
    )

    internal = internal_generation(state, generation)

    state =
      Enum.reduce(tps, state, fn {topic, partition} = tp, acc ->
        if acc.mode == :group do
          call_assignment_handler(acc, topic, partition, generation)
        end

        entry = %{
          pid: nil,
          ref: nil,
          generation: internal,
          public: generation,
          failures: 0,
          acked: nil
        }

        start_worker(put_in(acc.partitions[tp], entry), tp)
      end)

    {:noreply, state}
  end

  def handle_info({:ottla_revoked, id, _generation, tps}, state) do
    Logger.info("revoking #{inspect(tps)}", connection: state.connection)

    state =
      Enum.reduce(tps, state, fn tp, acc ->
        {entry, partitions} = Map.pop(acc.partitions, tp)
        if entry, do: stop_worker(acc, entry)
        %{acc | partitions: partitions}
      end)

    try do
      state.assignments_revoked_handler.()
    rescue
      e ->
        Logger.error(
          "assignments_revoked_handler raised: " <> Exception.format(:error, e, __STACKTRACE__)
        )
    end

    Native.consumer_revoke_done(state.resource, id)
    {:noreply, state}
  end

  def handle_info({:DOWN, ref, :process, _pid, reason}, state) do
    case Enum.find(state.partitions, fn {_tp, e} -> e.ref == ref end) do
      nil ->
        {:noreply, state}

      {{topic, partition} = tp, entry}
      when reason in [:normal, :shutdown] or
             (is_tuple(reason) and elem(reason, 0) == :shutdown) ->
        # Stopped on purpose (the connection is shutting down): no restart.
        Native.consumer_worker_down(state.resource, topic, partition, entry.generation)
        {:noreply, put_in(state.partitions[tp], %{entry | pid: nil, ref: nil})}

      {{topic, partition} = tp, entry} ->
        {:ok, acked} =
          Native.consumer_worker_down(state.resource, topic, partition, entry.generation)

        failures = if acked != entry.acked, do: 0, else: entry.failures + 1
        delay = backoff(failures)

        Logger.warning(
          "worker for #{topic}/#{partition} stopped (#{inspect(reason, limit: 5)}); " <>
            "restarting in #{delay} ms from the offset after #{inspect(acked)}",
          topic: topic,
          partition: partition
        )

        Process.send_after(self(), {:restart, tp, entry.generation}, delay)
        entry = %{entry | pid: nil, ref: nil, failures: failures, acked: acked}
        {:noreply, put_in(state.partitions[tp], entry)}
    end
  end

  def handle_info({:restart, tp, generation}, state) do
    case state.partitions do
      %{^tp => %{generation: ^generation, pid: nil}} -> {:noreply, start_worker(state, tp)}
      _ -> {:noreply, state}
    end
  end

  def handle_info({:EXIT, _pid, reason}, state), do: {:stop, reason, state}
  def handle_info(_other, state), do: {:noreply, state}

  @impl true
  def terminate(_reason, state) do
    # Workers have been stopped by the supervisor (they come after us); commit what they
    # acked, leave the group, free the client.
    Native.consumer_close(state.resource)
    :persistent_term.erase({__MODULE__, state.connection})
    :ok
  end

  defp internal_generation(%{mode: :group}, generation), do: generation
  defp internal_generation(_state, nil), do: 1

  defp backoff(0), do: 0
  defp backoff(failures), do: min(100 * Integer.pow(2, min(failures - 1, 20)), @max_backoff)

  defp call_assignment_handler(state, topic, partition, generation) do
    case state.assignment_received_handler.(state.group, topic, partition, generation) do
      :ok ->
        :ok

      other ->
        Logger.warning(
          "assignment_received_handler returned #{inspect(other)} for #{topic}/#{partition}"
        )
    end
  rescue
    e ->
      Logger.error(
        "assignment_received_handler raised: " <> Exception.format(:error, e, __STACKTRACE__)
      )
  end

  defp start_worker(state, {topic, partition} = tp) do
    entry = state.partitions[tp]

    args = %{
      topic: topic,
      partition: partition,
      generation: entry.generation,
      public_generation: entry.public,
      connection: state.connection,
      resource: state.resource,
      handler: state.handler,
      handler_init_args: state.handler_init_args,
      shutdown: max(state.drain_timeout, 100)
    }

    result =
      try do
        DynamicSupervisor.start_child(state.worker_sup, {Ottla.Consumer.Worker, args})
      catch
        :exit, reason -> {:error, {:exit, reason}}
      end

    case result do
      {:ok, pid} ->
        put_in(state.partitions[tp], %{entry | pid: pid, ref: Process.monitor(pid)})

      :ignore ->
        state

      {:error, reason} ->
        failures = entry.failures + 1

        Logger.error(
          "could not start the worker for #{topic}/#{partition}: #{inspect(reason, limit: 5)}"
        )

        Process.send_after(self(), {:restart, tp, entry.generation}, backoff(failures))
        put_in(state.partitions[tp], %{entry | failures: failures})
    end
  end

  defp stop_worker(state, %{pid: pid, ref: ref}) when is_pid(pid) do
    Process.demonitor(ref, [:flush])

    try do
      DynamicSupervisor.terminate_child(state.worker_sup, pid)
    catch
      :exit, _ -> :ok
    end
  end

  defp stop_worker(_state, _entry), do: :ok
end
